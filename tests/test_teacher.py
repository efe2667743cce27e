"""templates.py teacher client and `distill`, against a stub OpenAI-compatible server on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import templates as T

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "tests" / "data" / "cmexam_sample.csv"
ROWS = T.load_cmexam(SAMPLE_CSV)
IDS = sorted(row["id"] for row in ROWS)


def trajectory(letters):
    return f"<think>\n审题……逐项分析……自我检查……\n</think>\n依据如上。\n答案：{letters}"


def wrong(row):
    return next(letter for letter in row["options"] if letter not in row["answer"])


def ok(text):
    return 200, {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}, 0


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung handler must not hold up teardown
    request_queue_size = 64  # the default backlog of 5 drops connections when 8 arrive at once


class Stub:
    """/v1/chat/completions whose reply is `behave(row, hinted, n)`: row is the CMExam row the prompt asks
    about (None if none), hinted whether the gold answer is shown, n the 1-based call count for that row.
    behave returns (status, JSON-able or raw bytes body, seconds to wait before answering)."""

    def __init__(self, behave):
        self.behave, self.requests, self.calls, self.lock = behave, [], Counter(), threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                row = next((r for r in ROWS if T.format_question(r) in prompt), None)
                with stub.lock:
                    stub.requests.append((self.path, dict(self.headers), body))
                    stub.calls[row["id"] if row else None] += 1
                    n = stub.calls[row["id"] if row else None]
                status, payload, delay = stub.behave(row, "本题的正确答案是" in prompt, n)
                time.sleep(delay)
                data = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def stub():
    servers = []

    def start(behave):
        servers.append(Stub(behave))
        return servers[-1]
    yield start
    for s in servers:
        s.server.shutdown()
        s.server.server_close()


def config(url, **kw):
    return T.TeacherConfig(**{"base_url": url, "model": "stub", "timeout": 2.0, "max_retries": 5,
                              "backoff_base": 0.01, "backoff_max": 0.05, "concurrency": 4, **kw})


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()] if Path(path).exists() else []


def assert_each_question_once(out):
    """No lost or duplicated record: kept + failed ids are all the questions, each exactly once."""
    records = read_jsonl(out) + read_jsonl(Path(str(out).replace(".jsonl", ".failed.jsonl")))
    assert sorted(r["id"] for r in records) == IDS
    return records


MESSAGES = [{"role": "user", "content": "你好"}]


# ----------------------------------------------------------------------------------------------------------------
# chat_completion

def test_survives_500_429_garbage_and_missing_choices(stub):
    failures = [(500, {"error": "boom"}, 0), (429, {"error": "slow down"}, 0), (200, b"<html>not json", 0),
                (200, {"choices": []}, 0), (200, {"object": "error", "message": "no choices"}, 0)]
    server = stub(lambda row, hinted, n: failures[n - 1] if n <= len(failures) else ok("好"))
    stats = Counter()
    assert T.chat_completion(config(server.url + "/v1/"), MESSAGES, stats) == "好"
    assert stats == {"requests": 6, "http_500": 1, "http_429": 1, "bad_response": 3}
    path, headers, body = server.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "stub" and body["messages"] == MESSAGES
    assert (body["temperature"], body["top_p"]) == (0.5, 0.9)


def test_timeout_is_retried(stub):
    server = stub(lambda row, hinted, n: (200, ok("迟到")[1], 3.0 if n == 1 else 0))
    stats = Counter()
    start = time.monotonic()
    assert T.chat_completion(config(server.url, timeout=0.5), MESSAGES, stats) == "迟到"
    assert stats == {"requests": 2, "timeout": 1} and time.monotonic() - start < 2.5


@pytest.mark.parametrize("status", [400, 404])
def test_other_4xx_fail_at_once(stub, status):
    server = stub(lambda row, hinted, n: (status, {"error": "no"}, 0))
    with pytest.raises(T.TeacherError) as e:
        T.chat_completion(config(server.url), MESSAGES)
    assert e.value.kind == f"http_{status}" and len(server.requests) == 1


@pytest.mark.parametrize("status", [401, 403])
def test_refused_key_stops_the_run(stub, status):
    server = stub(lambda row, hinted, n: (status, {"error": "no"}, 0))
    with pytest.raises(T.TeacherFatal, match=f"http_{status}.*OPENAI_API_KEY"):
        T.chat_completion(config(server.url), MESSAGES)
    assert len(server.requests) == 1


def test_retries_run_out(stub):
    server = stub(lambda row, hinted, n: (503, {"error": "down"}, 0))
    stats = Counter()
    with pytest.raises(T.TeacherError, match="http_503"):
        T.chat_completion(config(server.url, max_retries=2), MESSAGES, stats)
    assert len(server.requests) == 3 and stats == {"requests": 3, "http_503": 3}


def test_connection_refused_is_retried_then_raised():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stats = Counter()
    with pytest.raises(T.TeacherError, match="connection"):
        T.chat_completion(config(f"http://127.0.0.1:{port}", max_retries=2), MESSAGES, stats)
    assert stats == {"requests": 3, "connection": 3}


def test_separate_reasoning_is_put_back_into_think_tags(stub):
    replies = [({"content": "答案：A", "reasoning_content": "想一想"}, "<think>\n想一想\n</think>\n\n答案：A"),  # vLLM parser
               ({"content": "想一想\n</think>\n答案：A"}, "<think>\n想一想\n</think>\n答案：A")]  # QwQ opens <think> in the prompt
    server = stub(lambda row, hinted, n: (200, {"choices": [{"message": replies[n - 1][0]}]}, 0))
    for _, expected in replies:
        assert T.chat_completion(config(server.url), MESSAGES) == expected


def test_api_key_is_sent_and_never_written(stub, tmp_path, monkeypatch, capsys, caplog):
    key = "sk-test-5f2e9c1b7a"
    monkeypatch.setenv("MEDCRITICAL_TEST_KEY", key)
    server = stub(lambda row, hinted, n: ok(trajectory(row["answer"] if row else "A")) if n > 1 else (500, {}, 0))
    T.distill(config(server.url, api_key_env="MEDCRITICAL_TEST_KEY"), SAMPLE_CSV, tmp_path / "sft.jsonl", limit=3)
    assert {headers.get("Authorization") for _, headers, _ in server.requests} == {f"Bearer {key}"}
    captured = capsys.readouterr()
    written = "".join(p.read_text(encoding="utf-8") for p in tmp_path.iterdir())
    assert key not in captured.out + captured.err + caplog.text + written
    monkeypatch.delenv("MEDCRITICAL_TEST_KEY")
    T.chat_completion(config(server.url, api_key_env="MEDCRITICAL_TEST_KEY"), MESSAGES)
    assert "Authorization" not in server.requests[-1][1]


# ----------------------------------------------------------------------------------------------------------------
# distill

def mixed(row, hinted, n):
    """Per question: always wrong, right on the 3rd try, a 500 first, malformed first, or right at once."""
    kind = row["id"] % 5
    if kind == 0 or (kind == 1 and n < 3):
        return ok(trajectory(wrong(row)))
    if kind == 2 and n == 1:
        return 500, {"error": "overloaded"}, 0
    if kind == 3 and n == 1:
        return ok(f"答案：{row['answer']}")  # right letters, but no <think>: not SFT material
    return ok(trajectory(row["answer"]))


def test_distill_keeps_only_correct_trajectories(stub, tmp_path):
    server = stub(mixed)
    out = tmp_path / "sft.jsonl"
    summary = T.distill(config(server.url), SAMPLE_CSV, out, tries=4)
    n_wrong = sum(r["id"] % 5 == 0 for r in ROWS)
    assert summary == {"questions": 29, "already_done": 0, "kept": 29 - n_wrong, "kept_with_hint": 0,
                       "failed": n_wrong, "errored": 0, "teacher_requests": len(server.requests),
                       "malformed": sum(r["id"] % 5 == 3 for r in ROWS), "dropped_prompt_reference": 0,
                       "think_merged": 0, "errors": {"http_500": 6}}
    rows = {row["id"]: row for row in ROWS}
    for record in read_jsonl(out):
        row = rows[record["id"]]
        assert set(record) == {"messages", "id", "answer", "predicted", "hint", "tries", "kept", "teacher"}
        # the user turn is the plain student prompt, not the teacher prompt with its templates
        assert record["messages"] == T.student_messages(row) + [{"role": "assistant", "content": trajectory(row["answer"])}]
        assert record["answer"] == record["predicted"] == row["answer"] and record["hint"] is False
        assert record["tries"] == {1: 3, 2: 1, 3: 2, 4: 1}[row["id"] % 5] and record["kept"] is True
    for record in read_jsonl(tmp_path / "sft.failed.jsonl"):
        assert record["kept"] is False and record["tries"] == 4 and "messages" not in record
        assert record["predicted"] == [wrong(rows[record["id"]])] * 4
    assert_each_question_once(out)
    assert not any("本题的正确答案是" in body["messages"][-1]["content"] for _, _, body in server.requests)


def test_hint_is_an_explicit_recorded_fallback(stub, tmp_path):
    server = stub(lambda row, hinted, n: ok(trajectory(row["answer"] if hinted else wrong(row))))
    summary = T.distill(config(server.url), SAMPLE_CSV, tmp_path / "plain.jsonl", tries=2, limit=5)
    assert (summary["kept"], summary["failed"]) == (0, 5) and len(server.requests) == 10
    summary = T.distill(config(server.url), SAMPLE_CSV, tmp_path / "hinted.jsonl", tries=2, hint_fallback=True, limit=5)
    assert (summary["kept"], summary["kept_with_hint"], summary["failed"]) == (5, 5, 0)
    for record in read_jsonl(tmp_path / "hinted.jsonl"):
        assert record["hint"] is True and record["tries"] == 3
        assert "提示" not in record["messages"][0]["content"]  # the student never sees the hint


def test_nested_think_is_merged_and_texts_that_refer_to_the_prompt_are_dropped(stub, tmp_path):
    """QwQ opens <think> itself, so a reply may hold a second opening, or (reasoning field put back) two blocks;
    either is merged into one block and kept. A right trajectory that mentions the exemplar, or (hinted) the
    hint, is dropped and counted, and the next try asked."""
    def behave(row, hinted, n):
        kind, gold = row["id"] % 4, row["answer"]
        if kind == 0:
            return ok(f"<think>\n好的，我按要求作答。\n<think>\n推理\n</think>\n答案：{gold}")
        if kind == 1:
            return 200, {"choices": [{"message": {"content": f"<think>\n推理\n</think>\n答案：{gold}",
                                                  "reasoning_content": "先想想"}}]}, 0
        if kind == 2:
            return ok(trajectory(gold).replace("审题", "按照示例审题") if n == 1 else trajectory(gold))
        return ok(trajectory(gold).replace("审题", "题目提示正确答案是" + gold) if hinted else trajectory(wrong(row)))
    server = stub(behave)
    out = tmp_path / "sft.jsonl"
    summary = T.distill(config(server.url), SAMPLE_CSV, out, tries=1, hint_fallback=True, limit=8)
    assert (summary["kept"], summary["failed"], summary["malformed"]) == (6, 2, 0)
    assert (summary["think_merged"], summary["dropped_prompt_reference"]) == (4, 2 + 2)  # ids 2, 6; ids 3, 7
    kept = {r["id"]: r["messages"][-1]["content"] for r in read_jsonl(out)}
    rows = {row["id"]: row for row in ROWS}
    assert kept[0] == f"<think>\n好的，我按要求作答。\n\n推理\n</think>\n答案：{rows[0]['answer']}"
    assert kept[1] == f"<think>\n先想想\n\n推理\n</think>\n答案：{rows[1]['answer']}"
    assert kept[2] == trajectory(rows[2]["answer"]) and all(T.is_well_formed(t) for t in kept.values())
    assert sorted(r["id"] for r in read_jsonl(tmp_path / "sft.failed.jsonl")) == [3, 7]


def test_prompt_reference_phrases():
    assert T.prompt_reference("原解答第二步错了") == "原解答" and T.prompt_reference("与示例一样") == "示例"
    assert T.prompt_reference("心电图提示心肌梗死，需进一步检查。") == ""  # medical 提示 / 检查
    assert T.prompt_reference("题目提示正确答案是B") == ""  # no hint shown: not a leak
    assert T.prompt_reference("题目提示正确答案是B", hinted=True) == "题目提示"
    assert T.prompt_reference("所以正确答案是B。", hinted=True) == "正确答案是"
    hint = T._hint("B")  # every hint phrase the prompt itself uses is caught when echoed
    assert T.prompt_reference(hint, hinted=True) and T.prompt_reference(hint) == ""
    critique = T.critique_messages({"question": "q", "options": {"A": "a", "B": "b"}, "answer": "B"}, "x")
    assert T.prompt_reference(critique[0]["content"]) == "原解答"
    assert T.prompt_reference(T.teacher_messages({"question": "q", "options": {"A": "a"}, "answer": "A"})[0]["content"])


def test_teacher_errors_leave_the_question_for_the_next_run(stub, tmp_path):
    down = stub(lambda row, hinted, n: (502, b"bad gateway", 0))
    out = tmp_path / "sft.jsonl"
    summary = T.distill(config(down.url, max_retries=1), SAMPLE_CSV, out)
    assert summary["errored"] == 29 and summary["errors"] == {"http_502": 58} and read_jsonl(out) == []
    up = stub(lambda row, hinted, n: ok(trajectory(row["answer"])))
    summary = T.distill(config(up.url), SAMPLE_CSV, out)
    assert summary["kept"] == 29 and summary["errors"] == {}
    assert_each_question_once(out)


def test_garbage_and_hangs_inside_a_run(stub, tmp_path):
    def flaky(row, hinted, n):
        if n == 1:
            return (200, b"{\"choices\": [", 0) if row["id"] % 2 else (200, ok("")[1], 3.0)
        return ok(trajectory(row["answer"]))
    server = stub(flaky)
    summary = T.distill(config(server.url, timeout=0.5, concurrency=8), SAMPLE_CSV, tmp_path / "sft.jsonl", limit=8)
    assert summary["kept"] == 8 and summary["errors"] == {"bad_response": 4, "timeout": 4}


def test_killed_run_resumes_with_nothing_lost_or_duplicated(stub, tmp_path, monkeypatch):
    server = stub(mixed)
    out = tmp_path / "sft.jsonl"
    real_append, writes = T.append_jsonl, []

    def dying_append(f, record):
        if len(writes) == 7:
            raise KeyboardInterrupt  # killed between two writes
        writes.append(record["id"])
        real_append(f, record)
    monkeypatch.setattr(T, "append_jsonl", dying_append)
    with pytest.raises(KeyboardInterrupt):
        T.distill(config(server.url), SAMPLE_CSV, out)
    monkeypatch.setattr(T, "append_jsonl", real_append)
    with open(out, "a", encoding="utf-8") as f:  # and killed in the middle of a write
        f.write('{"messages": [{"role": "user", "content": "半')
    summary = T.distill(config(server.url), SAMPLE_CSV, out)
    assert summary["already_done"] == 7 and summary["kept"] + summary["failed"] == 22
    assert_each_question_once(out)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": 1, "question": "q", "options": {"A": "a"}, "answer": "A"}\n' * 2, encoding="utf-8")
    with pytest.raises(ValueError, match="not unique"):
        T.distill(config("http://127.0.0.1:9"), path, tmp_path / "out.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# the command line, in a subprocess

def run_cli(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "templates.py"), *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, **kw)


def test_help():
    for args in (["--help"], ["distill", "--help"]):
        out, _ = run_cli(*args).communicate(timeout=30)
        assert "distill" in out and ("--hint-fallback" in out or args == ["--help"])


def test_cli_killed_midway_resumes(stub, tmp_path):
    server = stub(lambda row, hinted, n: (*ok(trajectory(row["answer"]))[:2], 0.1))
    out = tmp_path / "sft.jsonl"
    args = ["distill", "--data", SAMPLE_CSV, "--out", out, "--base-url", server.url, "--model", "stub",
            "--concurrency", "2", "--backoff-base", "0.01"]
    proc = run_cli(*args)
    deadline = time.monotonic() + 30
    while len(read_jsonl(out)) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.communicate()
    n_before = len(read_jsonl(out))
    assert 5 <= n_before < 29
    stdout, stderr = run_cli(*args).communicate(timeout=60)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["already_done"] == n_before and summary["kept"] == 29 - n_before, stderr
    assert all(r["kept"] for r in assert_each_question_once(out))
    assert os.path.getsize(tmp_path / "sft.failed.jsonl") == 0


# ----------------------------------------------------------------------------------------------------------------
# the command line under faults: a key with line breaks, a dead or refusing teacher, two runs, Ctrl-C

def finish(proc, timeout=60):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def test_a_key_with_line_breaks_never_appears_anywhere(stub, tmp_path):
    server = stub(lambda row, hinted, n: ok(trajectory(row["answer"])))
    args = ["distill", "--data", SAMPLE_CSV, "--base-url", server.url, "--limit", "2"]
    secret = "sk-test-7d1f0a"
    env = {**os.environ, "OPENAI_API_KEY": f"{secret}\r\n"}  # read from a CRLF file
    code, stdout, stderr = finish(run_cli(*args, "--out", tmp_path / "a.jsonl", env=env))
    assert code == 0, stderr
    assert {headers["Authorization"] for _, headers, _ in server.requests} == {f"Bearer {secret}"}
    env = {**os.environ, "OPENAI_API_KEY": "sk-in\r\nside-5e3b"}  # no header can carry it
    code, stdout2, stderr2 = finish(run_cli(*args, "--out", tmp_path / "b.jsonl", env=env))
    assert code == 2 and stderr2.strip().splitlines()[-1].startswith("error: $OPENAI_API_KEY holds a character")
    written = "".join(p.read_text(encoding="utf-8") for p in tmp_path.iterdir())
    for text in (stdout + stderr, stdout2 + stderr2, written):
        assert secret not in text and "sk-in" not in text and "side-5e3b" not in text
    assert "Traceback" not in stderr2 and len(server.requests) == 2


def test_a_dead_teacher_stops_the_run_at_once_with_an_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()  # default settings: 8 in flight, 5 retries each with 2 s * 2^k backoff
    code, stdout, stderr = finish(run_cli("distill", "--data", SAMPLE_CSV, "--out", tmp_path / "x.jsonl",
                                          "--base-url", f"http://127.0.0.1:{port}"))
    assert code == 2 and time.monotonic() - start < 20
    assert stderr.strip().splitlines()[-1].startswith(f"error: 8 requests in a row could not connect to "
                                                      f"http://127.0.0.1:{port}")


def test_a_dead_teacher_stops_the_run_with_one_request_in_flight_too(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, stderr = finish(run_cli("distill", "--data", SAMPLE_CSV, "--out", tmp_path / "x.jsonl", "--base-url",
                                     f"http://127.0.0.1:{port}", "--concurrency", "1", "--backoff-base", "0.01",
                                     "--max-connection-failures", "3"))
    assert code == 2 and "3 requests in a row could not connect" in stderr.splitlines()[-1]
    assert read_jsonl(tmp_path / "x.jsonl") == [] == read_jsonl(tmp_path / "x.failed.jsonl")


@pytest.mark.parametrize("status, needle", [(401, "refused the request (http_401"),
                                            (502, "29 questions got no usable reply")])
def test_a_refusing_or_broken_teacher_exits_non_zero(stub, tmp_path, status, needle):
    server = stub(lambda row, hinted, n: (status, {"error": "no"}, 0))
    code, stdout, stderr = finish(run_cli("distill", "--data", SAMPLE_CSV, "--out", tmp_path / "x.jsonl",
                                          "--base-url", server.url, "--max-retries", "0"))
    assert code == 2 and needle in stderr.strip().splitlines()[-1], stderr
    assert len(server.requests) <= 8 if status == 401 else len(server.requests) == 29  # 401: at most those in flight
    assert read_jsonl(tmp_path / "x.jsonl") == [] == read_jsonl(tmp_path / "x.failed.jsonl")  # asked again next time


def test_two_identical_runs_the_second_refuses_nothing_duplicated(stub, tmp_path):
    server = stub(lambda row, hinted, n: (*ok(trajectory(row["answer"]))[:2], 0.5))  # ~7 s: the second starts in time
    out = tmp_path / "sft.jsonl"
    args = ["distill", "--data", SAMPLE_CSV, "--out", out, "--base-url", server.url, "--concurrency", "2"]
    first = run_cli(*args)
    deadline = time.monotonic() + 30
    while not read_jsonl(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    code, _, stderr = finish(run_cli(*args))
    assert code == 2 and f"in use by PID {first.pid}" in stderr.strip().splitlines()[-1]
    code, _, stderr = finish(first)
    assert code == 0, stderr
    assert all(r["kept"] for r in assert_each_question_once(out))


def test_ctrl_c_stops_within_seconds_and_keeps_what_finished(stub, tmp_path):
    """Odd questions hang 30 s. SIGINT must not wait for them (nor retry them), and what came back is kept."""
    server = stub(lambda row, hinted, n: (*ok(trajectory(row["answer"]))[:2], 30 if row["id"] % 2 else 0))
    out = tmp_path / "sft.jsonl"
    args = ["distill", "--data", SAMPLE_CSV, "--out", out, "--base-url", server.url, "--concurrency", "4"]
    proc = run_cli(*args)
    deadline = time.monotonic() + 30
    while len(server.requests) < 6 and time.monotonic() < deadline:  # 4 threads stuck on odd questions
        time.sleep(0.02)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    code, _, stderr = finish(proc)
    assert code == 130 and time.monotonic() - start < 5, stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted")
    kept = read_jsonl(out)
    assert len(kept) >= 2 and all(r["id"] % 2 == 0 for r in kept)
    fast = stub(lambda row, hinted, n: ok(trajectory(row["answer"])))
    code, stdout, stderr = finish(run_cli(*args[:-4], "--base-url", fast.url))
    assert code == 0 and json.loads(stdout.splitlines()[-1])["already_done"] == len(kept)
    assert_each_question_once(out)
