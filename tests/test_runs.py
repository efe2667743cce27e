"""What every script shares (templates.py's run helpers): one writer per output, no orphans after a killed launcher,
one-line errors for bad input, arguments checked at parse time, resume refusing other data, --help with defaults.
Most tests run the real command lines in subprocesses, since exit codes, stderr and process trees are the point."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dpo
import eval_cmexam
import model as M
import selfplay as S
import sft
import templates as T
from conftest import ROOT
from test_selfplay import model_dir, rows, tokenizer  # noqa: F401 -- fixtures: a tiny checkpoint and tokenizer
from test_sft import QUESTIONS, chat_record, tiny, write_jsonl  # noqa: F401 -- `tiny` is a fixture

SAMPLE_CSV = ROOT / "tests" / "data" / "cmexam_sample.csv"
FAKE_DPO = ROOT / "tests" / "selfplay_fake_dpo.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def cli(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result, *needles):
    """Exit status 2 and one `error: ...` line holding every needle, last on stderr (after any warnings about
    skipped rows), and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(str(n) in lines[-1] for n in needles), (lines[-1], needles)
    return lines[-1]


def alive(pid):
    """True while any thread of `pid` runs (a zombie has finished: init or a subreaper has only to reap it). Every
    thread counts: a leader whose main thread has exited shows Z while its other threads, which still hold its files
    (the run's lock among them), wind down."""
    try:
        return any((task / "stat").read_text().split(")")[-1].split()[0] != "Z"
                   for task in Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return False


def children(pid):
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"still waiting after {seconds} s: {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------------------------------
# 2. One writer per output; a killed writer's lock is taken over

HOLD = "import sys, time, templates\nfor p in sys.argv[1:]: templates.lock_output(p)\nprint('locked', flush=True)\n" \
       "time.sleep(600)"


def test_a_second_writer_of_any_script_stops_at_once_naming_the_holder(tmp_path):
    outs = {name: tmp_path / name for name in ("sft", "dpo", "selfplay", "eval")}
    for folder in outs.values():
        folder.mkdir()
    targets = [outs["sft"], outs["dpo"], outs["selfplay"], outs["eval"] / "cot.predictions.jsonl",
               tmp_path / "distill.jsonl"]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, *map(str, targets)], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        commands = [
            ["sft.py", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", outs["sft"]],
            ["dpo.py", "--model", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--out", outs["dpo"]],
            ["selfplay.py", "--model", tmp_path / "m", "--data", SAMPLE_CSV, "--out", outs["selfplay"]],
            ["eval_cmexam.py", "--model", tmp_path / "m", "--data", SAMPLE_CSV, "--out", outs["eval"]],
            ["templates.py", "distill", "--data", SAMPLE_CSV, "--out", tmp_path / "distill.jsonl",
             "--base-url", "http://127.0.0.1:9"]]
        for command in commands:
            assert_one_line_error(cli(*command), f"in use by PID {holder.pid}", "wait for it or stop it")
        assert not (tmp_path / "distill.jsonl").exists() and not list(outs["eval"].glob("*.run.json"))
    finally:
        holder.kill()  # kill -9: no chance to unlock; the kernel drops its flocks
        holder.wait()
    taker = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), *map(str, targets)],
                           cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert taker.stdout == "locked\n", taker.stderr
    assert (outs["sft"] / ".lock").read_text().split()[0] != str(holder.pid)


# ----------------------------------------------------------------------------------------------------------------
# 2. A killed launcher leaves no orphan


def test_workers_die_with_a_killed_torchrun(tiny, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    out = tmp_path / "run"
    command = [*TORCHRUN, ROOT / "sft.py", "--init-config", tiny / "config.json", "--tokenizer", tiny, "--data",
               data, "--out", out, "--batch-size", "2", "--steps", "100000", "--save-every", "100000"]
    launcher = subprocess.Popen(list(map(str, command)), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text(),
                   120, "training to start")
        workers = children(launcher.pid)
        assert len(workers) == 2 and all(map(alive, workers))
        launcher.kill()
        launcher.wait()
        wait_until(lambda: not any(map(alive, workers)), 20, f"orphaned workers {workers} to exit")
    finally:
        launcher.kill()
        launcher.wait()
    assert T.lock_output(out)  # the folder is free for "the same command again"


@pytest.mark.parametrize("nproc", [1, 2])
def test_dpo_subprocess_dies_with_a_killed_selfplay(nproc, tmp_path, model_dir, rows):  # noqa: F811
    """selfplay -9'd during its DPO run: the DPO process (plain python, or torchrun and its two workers) ends too."""
    out, hang = tmp_path / "run", tmp_path / "dpo_pids"
    round_1 = out / "round_1"
    round_1.mkdir(parents=True)  # round 1's pairs are committed already, so the run goes straight to DPO
    S.write_jsonl(round_1 / "samples.jsonl", [{"id": row["id"], "round": 1, "answer": row["answer"], "hint": False,
                                                "skipped": "too_long", "samples": [], "pairs": 0, "duplicates": 0}
                                               for row in rows])
    S.write_jsonl(round_1 / "pairs.jsonl", [S.pair_record(rows[0], "对", "错", round=1, source="correction")])
    env = {**ENV, "FAKE_DPO_LOG": str(tmp_path / "log.jsonl"), "FAKE_DPO_HANG": str(hang)}
    command = ["selfplay.py", "--model", model_dir, "--data", SAMPLE_CSV, "--out", out, "--rounds", "1",
               "--dpo-script", FAKE_DPO, "--nproc", nproc]
    driver = subprocess.Popen([sys.executable, *map(str, command)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: hang.is_file() and len(hang.read_text().split()) == nproc, 120, "DPO to start")
        dpo_processes = children(driver.pid) + [int(pid) for pid in hang.read_text().split()]
        assert all(map(alive, dpo_processes))
        driver.kill()
        driver.wait()
        wait_until(lambda: not any(map(alive, dpo_processes)), 40, f"orphaned DPO processes {dpo_processes}")
    finally:
        driver.kill()
        driver.wait()


# ----------------------------------------------------------------------------------------------------------------
# 4. eval records its settings only once the model loaded; a missing folder is named as such


def test_mistyped_model_leaves_no_settings_behind(tmp_path, model_dir):  # noqa: F811
    out = tmp_path / "eval"
    result = cli("eval_cmexam.py", "--model", tmp_path / "mistyped", "--data", SAMPLE_CSV, "--out", out,
                 "--limit", 1, "--max-new-tokens", 2)
    assert_one_line_error(result, "mistyped: no such folder")
    assert not (out / "cot.run.json").exists()
    eval_cmexam.main(["--model", str(model_dir), "--data", str(SAMPLE_CSV), "--out", str(out), "--limit", "1",
                      "--max-new-tokens", "2"])  # the corrected command is not refused
    assert (out / "cot.run.json").is_file()


def test_a_dead_judge_stops_eval_and_records_no_question_as_judged(tmp_path, model_dir):  # noqa: F811
    """Before, every question became a `judge_connection` skip on file, never judged again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(T.TeacherFatal, match="8 requests in a row could not connect"):
        eval_cmexam.main(["--model", str(model_dir), "--data", str(SAMPLE_CSV), "--out", str(tmp_path), "--mode",
                          "judge", "--limit", "12", "--max-new-tokens", "2", "--batch-size", "12",
                          "--judge-base-url", f"http://127.0.0.1:{port}", "--judge-backoff-base", "0.01"])
    assert (tmp_path / "judge.predictions.jsonl").read_text() == ""


def test_ctrl_c_in_judge_mode_stops_within_seconds_and_keeps_the_verdicts_in(tmp_path, model_dir):  # noqa: F811
    """The judge answers even questions at once and hangs 30 s on odd ones; SIGINT must not wait for those."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    stems, asked = {row["question"]: row["id"] for row in T.load_cmexam(SAMPLE_CSV)}, []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
            question = next(i for stem, i in stems.items() if f"【题干】\n{stem}\n" in prompt)
            asked.append(question)
            time.sleep(30 if question % 2 else 0)
            data = json.dumps({"choices": [{"message": {"content": "判定：正确"}}]}).encode()
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        proc = subprocess.Popen([sys.executable, *map(str, [
            "eval_cmexam.py", "--model", model_dir, "--data", SAMPLE_CSV, "--out", tmp_path, "--mode", "judge",
            "--judge-protocol", "rubric",
            "--max-new-tokens", 2, "--batch-size", 29, "--judge-concurrency", 4,
            "--judge-base-url", f"http://127.0.0.1:{server.server_address[1]}"])], cwd=ROOT, env=ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: len(asked) >= 6, 120, "the judge to be asked")
        time.sleep(0.5)  # 4 requests hang on odd questions by now
        proc.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130 and time.monotonic() - start < 5, stderr[-2000:]
    finally:
        server.shutdown()
        server.server_close()
    records = [json.loads(line) for line in (tmp_path / "judge.predictions.jsonl").read_text().splitlines()]
    assert records and all(r["id"] % 2 == 0 and r["correct"] is True and r["skipped"] is None for r in records)


# ----------------------------------------------------------------------------------------------------------------
# 5. Zero and negative arguments are refused at parse time


@pytest.mark.parametrize("main, argv, message", [
    (T.main, ["distill", "--data", "d.csv", "--out", "o.jsonl", "--limit", "-1"], "--limit: must be >= 1, not -1"),
    (T.main, ["distill", "--data", "d.csv", "--out", "o.jsonl", "--tries", "0"], "--tries: must be >= 1, not 0"),
    (T.main, ["distill", "--data", "d.csv", "--out", "o.jsonl", "--concurrency", "0"], "--concurrency"),
    (T.main, ["distill", "--data", "d.csv", "--out", "o.jsonl", "--top-p", "1.5"], "--top-p"),
    (eval_cmexam.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--limit", "-1"], "--limit"),
    (eval_cmexam.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (eval_cmexam.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--sample", "-3"], "--sample"),
    (eval_cmexam.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--judge-max-retries", "-1"], "retries"),
    (sft.main, ["--model", "m", "--data", "d.jsonl", "--out", "o", "--batch-size", "0"], "--batch-size"),
    (sft.main, ["--model", "m", "--data", "d.jsonl", "--out", "o", "--warmup", "2"], "--warmup"),
    (sft.main, ["--model", "m", "--data", "d.jsonl", "--out", "o", "--lr", "0"], "--lr: must be > 0"),
    (dpo.main, ["--model", "m", "--data", "d.jsonl", "--out", "o", "--beta", "0"], "--beta: must be > 0"),
    (dpo.main, ["--model", "m", "--data", "d.jsonl", "--out", "o", "--micro-batch-size", "0"], "--micro-batch"),
    (S.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--samples", "0"], "--samples"),
    (S.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--limit", "0"], "--limit"),
    (S.main, ["--model", "m", "--data", "d.csv", "--out", "o", "--batch-size", "-3"], "--batch-size"),
])
def test_bad_numbers_are_one_line_usage_errors(main, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: argument "), err
    assert message in err and not list(tmp_path.iterdir())  # nothing was written


# ----------------------------------------------------------------------------------------------------------------
# 6. Resume refuses other data of the same length, and other settings


def test_resume_refuses_other_data_of_the_same_length_and_other_settings(tiny, tmp_path):
    def run(data, *extra):
        return sft.main(["--init-config", str(tiny / "config.json"), "--tokenizer", str(tiny), "--data", str(data),
                         "--out", str(tmp_path / "run"), "--batch-size", "2", "--steps", "2", "--save-every", "1",
                         *extra])
    data = write_jsonl(tmp_path / "a.jsonl", [chat_record(q, a) for q, a in QUESTIONS])
    run(data)
    other = write_jsonl(tmp_path / "b.jsonl", [chat_record(q, a + " (really)") for q, a in QUESTIONS])
    with pytest.raises(T.UserError, match="data_sha256"):
        run(other, "--resume")
    with pytest.raises(T.UserError, match=r"'lr': \(1e-05, 0.001\)"):
        run(data, "--resume", "--lr", "1e-3")
    with pytest.raises(T.UserError, match="'steps'"):  # the cosine schedule depends on the number of steps
        run(data, "--resume", "--steps", "3")
    run(data, "--resume")  # the same command is accepted


def test_dpo_resume_refuses_another_beta_or_reference(tmp_path, model_dir, tokenizer, rows):  # noqa: F811
    pairs = [S.pair_record(row, f"<think>\n对{i}\n</think>\n答案：{row['answer']}", f"错{i}", source="correction")
             for i, row in enumerate(rows[:4])]
    data = tmp_path / "pairs.jsonl"
    S.write_jsonl(data, pairs)
    args = ["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "dpo"), "--batch-size", "2",
            "--steps", "1", "--max-length", "1024", "--max-prompt-length", "512"]
    dpo.main(args)
    with pytest.raises(T.UserError, match=r"'beta': \(0.3, 0.5\)"):
        dpo.main(args + ["--resume", "--beta", "0.5"])
    other = tmp_path / "other_model"
    M.save(M.load(model_dir), other)
    tokenizer.save(str(other / "tokenizer.json"))
    with pytest.raises(T.UserError, match="'reference'"):
        dpo.main(["--model", str(other), *args[2:], "--resume"])


# ----------------------------------------------------------------------------------------------------------------
# 7. Bad files: one line naming the file, exit 2; under torchrun, one line from rank 0


def test_bad_data_files_are_one_line_errors_naming_the_file(tmp_path):
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes(SAMPLE_CSV.read_text(encoding="utf-8").encode("gbk", errors="replace"))
    tsv = tmp_path / "exam.tsv"
    tsv.write_text(SAMPLE_CSV.read_text(encoding="utf-8"), encoding="utf-8")
    broken = tmp_path / "exam.json"
    broken.write_text('[{"question": "q", "options": {"A": "a"}, "answer": "A"},\n {"question": }]', encoding="utf-8")
    columns = tmp_path / "cols.csv"
    columns.write_text("Question,Explanation\n题,解析\n", encoding="utf-8")
    for path, needles in ((gbk, ["not UTF-8", "iconv"]), (tsv, [".csv, .json or .jsonl"]),
                          (broken, [f"{broken}:2:", "not JSON"]), (columns, ["missing required column"]),
                          (tmp_path / "none.csv", ["not found"])):
        assert_one_line_error(cli("templates.py", "show", "--data", path), path, *needles)


def test_bad_checkpoints_are_one_line_errors_naming_the_file(tmp_path, model_dir):  # noqa: F811
    def copy(name):
        folder = tmp_path / name
        folder.mkdir()
        for file in model_dir.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        return folder
    corrupt = copy("corrupt")
    (corrupt / "config.json").write_text('{"model_type": "qwen2",')
    llama = copy("llama")
    (llama / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                   "model_type": "llama"}))
    truncated = copy("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    for folder, needles in ((tmp_path / "missing", ["missing: no such folder"]),
                            (corrupt, [corrupt / "config.json", "not a JSON config"]),
                            (llama, [llama / "config.json", "'llama' is not qwen2"]),
                            (truncated, [truncated / "model.safetensors", "save or download it again"])):
        assert_one_line_error(cli("model.py", "--model", folder), *needles)


def test_a_corrupt_line_inside_a_resumable_output_is_named_with_a_way_out(tmp_path):
    out = tmp_path / "sft.jsonl"
    out.write_text('{"id": 0}\n{"id": 1, "messages": [tru\n{"id": 2}\n', encoding="utf-8")
    result = cli("templates.py", "distill", "--data", SAMPLE_CSV, "--out", out, "--base-url", "http://127.0.0.1:9")
    assert_one_line_error(result, f"{out}:2:", "delete that line", "another --out")


def test_dpo_names_the_file_line_of_a_bad_pair_and_refuses_no_pairs(tmp_path, tokenizer, capsys):  # noqa: F811
    data = tmp_path / "pairs.jsonl"
    data.write_text('\n{"prompt": "q", "chosen": "a", "rejected": }\n', encoding="utf-8")
    with pytest.raises(T.UserError, match="no usable preference pairs") as e:
        dpo.load_pairs(data, tokenizer, 64, 32)
    assert f"{data}:2: not JSON (Expecting value at column 44)" in str(e.value)
    assert f"{data}:2: not JSON" in capsys.readouterr().out


def test_under_torchrun_a_user_error_is_one_line_from_rank_0(tiny, tmp_path):
    result = subprocess.run(list(map(str, [*TORCHRUN, ROOT / "sft.py", "--init-config", tiny / "config.json",
                                           "--tokenizer", tiny, "--data", tmp_path / "none.jsonl", "--out",
                                           tmp_path / "run"])), cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=180)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "none.jsonl" in line]
    assert result.returncode != 0 and errors == [f"error: {tmp_path / 'none.jsonl'}: no such data file"], errors
    assert 'sft.py", line' not in result.stderr  # no traceback of ours (torchrun adds its own banner)


# ----------------------------------------------------------------------------------------------------------------
# 8. --help: every script, with defaults


@pytest.mark.parametrize("script, flag", [("templates.py distill", "--tries TRIES"), ("model.py", "--max-new-tokens"),
                                          ("sft.py", "--lr LR"), ("dpo.py", "--beta BETA"),
                                          ("selfplay.py", "--samples SAMPLES"),
                                          ("eval_cmexam.py", "--max-new-tokens MAX_NEW_TOKENS")])
def test_help_shows_defaults(script, flag):
    result = cli(*script.split(), "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert f"{flag} " in text and "(default: " in text.rsplit(flag, 1)[1][:300], text.rsplit(flag, 1)[1][:300]
    assert "(default: --model)" not in text
    if script == "selfplay.py":  # the docstring's shell line continuation survives
        assert "--rounds 2 --nproc 8 \\\n        --dpo-args" in result.stdout
