"""eval_cmexam.py: prediction records, direct-mode letter choice, the scorer against hand-computed numbers, resume,
and the judge protocol against a stub endpoint on 127.0.0.1. Tiny Qwen2-shaped models and a byte-level tokenizer
(no merges, Qwen's special tokens added) keep every run on CPU to a second or two."""
import csv
import hashlib
import json
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import eval_cmexam as E
import templates as T
from conftest import SHARED
from model import ModelConfig, Transformer, init_weights, load, save

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = ROOT / "tests" / "data" / "cmexam_sample.csv"
ROWS = T.load_cmexam(SAMPLE_CSV)
IDS = sorted(row["id"] for row in ROWS)
REAL_TOKENIZER = SHARED / "data" / "qwen2.5-tokenizer"


def byte_tokenizer():
    """Byte-level BPE with no merges: one token per UTF-8 byte (256), plus Qwen's three special tokens."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


TOK = byte_tokenizer()
CFG = ModelConfig(vocab_size=TOK.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=False)


def checkpoint(path, cfg=CFG, setup=None):
    """A random tiny model (optionally rewired by `setup`) saved with the tokenizer as a checkpoint folder."""
    model = init_weights(Transformer(cfg), seed=0)
    if setup:
        with torch.no_grad():
            setup(model)
    save(model, path)
    TOK.save(str(path / "tokenizer.json"))
    return path


def passthrough(model):
    """Zero every block's output so the final hidden state is the embedding of the last token alone."""
    for block in model.layers:
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def read(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run(ckpt, out, *extra, data=SAMPLE_CSV):
    return E.main(["--model", str(ckpt), "--data", str(data), "--out", str(out), *map(str, extra)])


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("random"))


# ----------------------------------------------------------------------------------------------------------------
# Both multiple-choice modes on the real sample: one well-formed record per question, a consistent report.

def annotated_csv(path):
    """The sample in the official test-file layout: the five annotation columns appended, values made up."""
    with open(SAMPLE_CSV, encoding="utf-8-sig", newline="") as f:
        records = list(csv.DictReader(f))
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, list(records[0]) + list(E.ANNOTATION_COLUMNS))
        writer.writeheader()
        for i, rec in enumerate(records):
            writer.writerow({**rec, "Disease Group": ["呼吸系统疾病", "循环系统疾病"][i % 2],
                             "Area of Competency": "医学知识", "Clinical Department": ["内科", "外科", "儿科"][i % 3],
                             "Medical Discipline": "临床医学", "Difficulty level": str(1 + i % 5) if i % 7 else ""})
    return path


@pytest.mark.parametrize("mode", ["cot", "direct"])
def test_each_mode_writes_one_wellformed_record_per_question(mode, random_ckpt, tmp_path):
    data = annotated_csv(tmp_path / "test_with_annotations.csv")
    report = run(random_ckpt, tmp_path / "out", "--mode", mode, "--max-new-tokens", 5, "--batch-size", 8, data=data)
    records = read(tmp_path / "out" / f"{mode}.predictions.jsonl")
    records_by_id = {r["id"]: r for r in records}
    assert sorted(records_by_id) == IDS and len(records) == len(IDS)
    rows = {row["id"]: row for row in T.load_cmexam(data)}
    for r in records:
        row = rows[r["id"]]
        assert r["mode"] == mode and r["gold"] == row["answer"] and r["skipped"] is None
        text = E.prompt_text(row, mode)
        assert r["prompt_hash"] == hashlib.sha256(text.encode()).hexdigest()[:16]
        assert set(r["extracted"]) <= set(row["options"]) and r["correct"] == (r["extracted"] == row["answer"])
        if mode == "cot":
            assert text == T.chat(T.student_messages(row)) and 1 <= r["new_tokens"] <= 5
            assert r["extracted"] == T.extract_answer(r["output"])
        else:
            assert text.endswith("<|im_start|>assistant\n答案：") and T.format_question(row) in text
            assert set(r["probs"]) == set(row["options"])  # no multi-letter tokens in a byte tokenizer
            assert len(r["extracted"]) == 1 if len(row["answer"]) == 1 else len(r["extracted"]) >= 2
            assert math.isclose(r["answer_mass"], sum(r["probs"].values()), abs_tol=1e-5)
    if mode == "direct":  # batched, padded scoring == the plain causal forward of each prompt alone
        model = load(random_ckpt)
        for row in sorted(rows.values(), key=lambda row: len(E.prompt_text(row, mode)))[::14]:
            ids = TOK.encode(E.prompt_text(row, mode), add_special_tokens=False).ids
            with torch.no_grad():
                p = model(torch.tensor([ids]))[0, -1].double().softmax(-1)
            for letter, q in records_by_id[row["id"]]["probs"].items():
                assert math.isclose(q, p[TOK.token_to_id(letter)].item(), rel_tol=1e-4)
    saved = json.loads((tmp_path / "out" / f"{mode}.report.json").read_text(encoding="utf-8"))
    assert saved["protocol"] == mode and saved["scored"] == len(IDS) == saved["overall"]["n"]
    assert saved["overall"]["correct"] == sum(r["correct"] for r in records) == report["overall"]["correct"]
    assert saved["answer_type"]["multiple"]["n"] == sum(len(row["answer"]) > 1 for row in ROWS) == 5
    assert set(saved["columns"]) == set(E.ANNOTATION_COLUMNS)
    for values in saved["columns"].values():
        assert sum(s["n"] for s in values.values()) == len(IDS)
    assert saved["columns"]["Difficulty level"]["(missing)"]["n"] == sum(i % 7 == 0 for i in range(30) if i != 29)


def test_help():
    result = subprocess.run([sys.executable, str(ROOT / "eval_cmexam.py"), "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--mode" in result.stdout and "judge" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Models wired by hand, so the right output is known before the run.

LETTER_LOGITS = {"A": 1.0, "B": 5.0, "C": 0.0, "D": 4.5, "E": 6.0}


def letters_model(model):
    """Every token embeds to all ones, the blocks pass it through, so every prompt's logits are lm_head's row sums:
    LETTER_LOGITS on the letter tokens, 0 on the other tokens."""
    passthrough(model)
    model.embed_tokens.weight.fill_(1.0)
    model.lm_head.weight.zero_()
    for letter, logit in LETTER_LOGITS.items():
        model.lm_head.weight[TOK.token_to_id(letter)] = logit / CFG.hidden_size


def test_direct_mode_picks_the_letters_the_model_scores_highest(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt", setup=letters_model)
    run(ckpt, tmp_path / "out", "--mode", "direct")
    records = {r["id"]: r for r in read(tmp_path / "out" / "direct.predictions.jsonl")}
    # By hand: E > B > D > A > C. Single answer: E, or B where the question has no option E. Multiple answer
    # (marginals over the candidates): with E, e^6 / (e^6 + e^5 + e^4.5 + e + 1) = 0.625 is the only one >= 0.5,
    # so the top two, BE; without E, B has 0.613, so BD.
    for row in ROWS:
        has_e, multiple = "E" in row["options"], len(row["answer"]) > 1
        expected = {(True, False): "E", (False, False): "B", (True, True): "BE", (False, True): "BD"}[has_e, multiple]
        assert records[row["id"]]["extracted"] == expected, row["id"]
    assert sum(len(row["options"]) == 4 for row in ROWS) == 3  # the case "no option E" is exercised
    # The recorded probabilities are the softmax over the whole vocabulary, in float64 by hand.
    z = sum(math.exp(v) for v in LETTER_LOGITS.values()) + (CFG.vocab_size - 5)
    r = records[ROWS[0]["id"]]
    for letter, logit in LETTER_LOGITS.items():
        assert math.isclose(r["probs"][letter], math.exp(logit) / z, rel_tol=1e-5)  # 6 digits stored
    assert r["output"] == "E"  # the greedy next token over the full vocabulary


SCRIPT = "答案：C"


def scripted_model(model):
    """Writes SCRIPT then <|im_end|> after any prompt: each token of the chain "\\n" -> 答案：C -> <|im_end|> embeds
    to its own one-hot direction, which lm_head maps to the next token of the chain."""
    passthrough(model)
    chain = TOK.encode("\n" + SCRIPT, add_special_tokens=False).ids + [TOK.token_to_id("<|im_end|>")]
    assert len(set(chain)) == len(chain) <= CFG.hidden_size
    model.embed_tokens.weight.zero_()
    model.lm_head.weight.zero_()
    for dim, (token, following) in enumerate(zip(chain, chain[1:])):
        model.embed_tokens.weight[token, dim] = 1.0
        model.lm_head.weight[following, dim] = 10.0


def test_cot_mode_end_to_end_and_prompts_too_long_are_counted_skips(tmp_path):
    lengths = {row["id"]: len(TOK.encode(T.chat(T.student_messages(row))).ids) for row in ROWS}
    context = sorted(lengths.values())[len(ROWS) // 2] + 16  # about half the prompts no longer fit with 16 new
    cfg = ModelConfig(**{**CFG.__dict__, "max_position_embeddings": context})
    ckpt = checkpoint(tmp_path / "ckpt", cfg, scripted_model)
    report = run(ckpt, tmp_path / "out", "--max-new-tokens", 16, "--batch-size", 4)
    records = {r["id"]: r for r in read(tmp_path / "out" / "cot.predictions.jsonl")}
    assert sorted(records) == IDS
    too_long = {i for i, n in lengths.items() if n + 16 > context}
    assert 5 < len(too_long) < len(ROWS) - 5
    for i, r in records.items():
        if i in too_long:
            assert r["skipped"] == "prompt_too_long" and r["correct"] is None and r["output"] == ""
        else:
            assert r["skipped"] is None and r["output"] == SCRIPT and r["finished"] and r["new_tokens"] == 11
            assert r["extracted"] == "C" and r["correct"] == (r["gold"] == "C")
    fit = [row for row in ROWS if row["id"] not in too_long]
    assert report["skipped"] == {"prompt_too_long": len(too_long)} and report["scored"] == len(fit)
    assert report["overall"]["correct"] == sum(row["answer"] == "C" for row in fit) > 0
    assert report["no_answer"]["n"] == 0 and report["truncated"]["n"] == 0


# ----------------------------------------------------------------------------------------------------------------
# The scorer, on hand-made predictions; every expected number below is worked out by hand.

def hand_rows():
    spec = [  # id, answer, Disease Group, Difficulty level
        (0, "A", "呼吸", "1"), (1, "B", "呼吸", "2"), (2, "AC", "循环", "1"), (3, "AC", "循环", "2"),
        (4, "D", "循环", "1"), (5, "E", "呼吸", ""), (6, "B", "循环", "1"), (7, "C", "呼吸", "2"),
        (8, "ABC", "呼吸", "1")]
    options = dict(zip("ABCDE", "甲乙丙丁戊"))
    return [{"id": i, "question": f"题{i}", "options": options, "answer": a, "Disease Group": g,
             "Difficulty level": d} for i, a, g, d in spec]


def mc(i, extracted, gold, mode="cot", **kw):
    return {"id": i, "mode": mode, "prompt_hash": "h", "gold": gold, "output": "", "extracted": extracted,
            "correct": None, "skipped": None, **kw}


HAND_PREDICTIONS = [mc(0, "A", "A"), mc(1, "C", "B"), mc(2, "CA", "AC"), mc(3, "A", "AC"), mc(4, "", "D"),
                    mc(5, "E", "E", finished=False), mc(6, "", "B", skipped="prompt_too_long"), mc(8, "ABC", "ABC")]


def test_score_by_category_hand_computed():
    report = E.score(HAND_PREDICTIONS, hand_rows())
    assert report["protocol"] == "cot" and report["questions"] == 9
    assert (report["scored"], report["missing"], report["skipped"]) == (7, 1, {"prompt_too_long": 1})
    # Wilson 95% for 4/7 by hand (z = 1.959964): center (4 + z^2/2) / (7 + z^2) = 5.920729 / 10.841459 = 0.546119,
    # half z / (7 + z^2) * sqrt(4 * 3 / 7 + z^2 / 4) = 0.180783 * 1.635436 = 0.295661.
    assert report["overall"] == {"n": 7, "correct": 4, "accuracy": pytest.approx(4 / 7), "ci95": pytest.approx(
        [0.250458, 0.841780], abs=2e-6)}
    n_correct = lambda s: (s["n"], s["correct"])  # noqa: E731
    assert n_correct(report["answer_type"]["single"]) == (4, 2)  # ids 0 1 4 5: 0 and 5 right
    assert n_correct(report["answer_type"]["multiple"]) == (3, 2)  # ids 2 3 8: CA == AC right, A != AC
    assert set(report["columns"]) == {"Disease Group", "Difficulty level"}
    assert {v: n_correct(s) for v, s in report["columns"]["Disease Group"].items()} == {"呼吸": (4, 3), "循环": (3, 1)}
    difficulty = report["columns"]["Difficulty level"]
    assert {v: n_correct(s) for v, s in difficulty.items()} == {"1": (4, 3), "2": (2, 0), "(missing)": (1, 1)}
    assert list(difficulty) == ["1", "2", "(missing)"]  # largest group first
    # Wilson 95% by hand: 3/4 -> center (3 + z^2/2) / (4 + z^2) = 0.62753, half z / (4 + z^2) * sqrt(3/4 + z^2/4)
    # = 0.32689; 0/2 -> [0, (z^2) / (2 + z^2)] = [0, 0.65762].
    assert difficulty["1"]["ci95"] == pytest.approx([0.300642, 0.954413], abs=1e-6)
    assert difficulty["2"]["ci95"] == pytest.approx([0.0, 0.657620], abs=1e-6)
    assert report["no_answer"] == {"n": 1, "share": pytest.approx(1 / 7)}
    assert report["truncated"]["n"] == 1
    table = E.format_report(report)
    assert "57.1" in table and "呼吸" in table and "skipped prompt_too_long: 1" in table and "MISSING" in table


def test_wilson_matches_newcombe_1998():
    # Newcombe, Statistics in Medicine 17:857 (1998), Table I, method 3 (Wilson score, no continuity correction).
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611),
                             (1, 29): (0.0061, 0.1718)}.items():
        assert E.wilson(k, n) == pytest.approx([lo, hi], abs=5e-5)
    assert E.wilson(0, 0) is None


def test_multiple_answer_exact_match_is_on_letter_sets():
    rows = [{"id": i, "question": "q", "options": dict(zip("ABCDE", "12345")), "answer": "AC"} for i in range(4)]
    preds = [mc(0, "AC", "AC"), mc(1, "CA", "AC"), mc(2, "A", "AC"), mc(3, "ACD", "AC")]
    report = E.score(preds, rows)
    assert (report["overall"]["n"], report["overall"]["correct"]) == (4, 2)
    assert report["answer_type"]["multiple"]["correct"] == 2 and report["answer_type"]["single"]["n"] == 0
    for i, expected in enumerate([True, True, False, False]):
        assert E.score([preds[i]], rows[i:i + 1])["overall"]["correct"] == expected


def test_score_rejects_duplicates_and_mixed_protocols():
    rows = hand_rows()
    with pytest.raises(ValueError, match="duplicate"):
        E.score([mc(0, "A", "A"), mc(0, "B", "A")], rows)
    with pytest.raises(ValueError, match="mix"):
        E.score([mc(0, "A", "A"), mc(1, "B", "B", mode="direct")], rows)


def test_choose_letters_rule():
    assert E.choose_letters({"A": 0.2, "B": 0.5, "C": 0.3}, multiple=False) == "B"
    assert E.choose_letters({"A": 0.3, "B": 0.3, "C": 0.1}, multiple=False) == "A"  # a tie goes to the first letter
    # Multi-letter tokens count for each of their letters: A = (0.1 + 0.5) / 0.8, C = (0.1 + 0.5) / 0.8, D = 0.1 / 0.8
    assert E.choose_letters({"A": 0.1, "C": 0.1, "D": 0.1, "AC": 0.5}, multiple=True) == "AC"
    # A = (0.3 + 0.2) / 1.0 = 0.5, D = (0.1 + 0.2) / 1.0 = 0.3, B = C = 0.2: only A reaches 0.5, so the top two.
    assert E.choose_letters({"A": 0.3, "B": 0.2, "C": 0.2, "D": 0.1, "AD": 0.2}, multiple=True) == "AD"
    # No letter reaches 0.5: the top two, A and the first letter of the B = C = D tie.
    assert E.choose_letters({"A": 0.4, "B": 0.2, "C": 0.2, "D": 0.2}, multiple=True) == "AB"
    assert E.choose_letters({"A": 0.05, "B": 0.05, "ABC": 0.9}, multiple=True) == "ABC"  # C has no token of its own


def test_answer_tokens_of_the_real_qwen_tokenizer():
    if not (REAL_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip("../shared/data/qwen2.5-tokenizer is absent")
    tok = Tokenizer.from_file(str(REAL_TOKENIZER / "tokenizer.json"))
    found = E.answer_token_ids(tok)
    # By hand from the tokenizer: "答案：A" -> [102349 答案, 5122 ：, 32 A]; "答案：AC" -> [..., 1706 AC];
    # "答案：ABD" -> [..., AB, D] (two tokens, so not a candidate).
    assert {s: found[s] for s in "ABCDE"} == dict(zip("ABCDE", range(32, 37)))
    assert found["AC"] == 1706 and "ABD" not in found and "ABCDE" in found
    assert E.answer_token_ids(TOK).keys() == set("ABCDE")


# ----------------------------------------------------------------------------------------------------------------
# Resume: nothing lost, nothing duplicated, nothing predicted twice.

def test_resume_after_limit_then_full_run(random_ckpt, tmp_path):
    run(random_ckpt, tmp_path, "--limit", 10, "--max-new-tokens", 3, "--batch-size", 4)
    path = tmp_path / "cot.predictions.jsonl"
    first = path.read_text(encoding="utf-8")
    assert sorted(r["id"] for r in read(path)) == IDS[:10]
    report = run(random_ckpt, tmp_path, "--max-new-tokens", 3, "--batch-size", 4)
    assert path.read_text(encoding="utf-8").startswith(first)  # the first ten untouched, not predicted again
    assert sorted(r["id"] for r in read(path)) == IDS and report["scored"] == len(IDS)


def test_resume_after_a_crash_and_a_torn_last_line(random_ckpt, tmp_path, monkeypatch):
    writes, append = [], T.append_jsonl

    def crash_after_seven(f, rec):
        if len(writes) == 7:
            raise KeyboardInterrupt
        writes.append(rec["id"])
        append(f, rec)

    monkeypatch.setattr(T, "append_jsonl", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run(random_ckpt, tmp_path, "--mode", "direct", "--batch-size", 4)
    monkeypatch.setattr(T, "append_jsonl", append)
    path = tmp_path / "direct.predictions.jsonl"
    assert [r["id"] for r in read(path)] == writes
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"id": 999, "mode": "dir')  # killed in the middle of a write
    report = run(random_ckpt, tmp_path, "--mode", "direct", "--batch-size", 4)
    records = read(path)
    assert sorted(r["id"] for r in records) == IDS and [r["id"] for r in records[:7]] == writes
    assert report["scored"] == len(IDS) and report["missing"] == 0


def test_resume_refuses_other_settings(random_ckpt, tmp_path):
    run(random_ckpt, tmp_path, "--limit", 2, "--max-new-tokens", 3)
    with pytest.raises(SystemExit, match="other settings"):
        run(random_ckpt, tmp_path, "--limit", 2, "--max-new-tokens", 4)


# ----------------------------------------------------------------------------------------------------------------
# The authors' protocol against a stub OpenAI-compatible judge that answers right / wrong / garbage / HTTP 500.

JUDGE_REPLIES = {0: (200, "<think>先想想。判定：错误</think>\n回答与标准答案一致。\n判定：正确"),
                 1: (200, "回答的诊断与标准答案不同。\n判定：错误"), 2: (200, "我觉得还行吧"), 3: (500, None)}


@pytest.fixture
def judge_server():
    prompts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = body["messages"][-1]["content"]
            prompts.append(prompt)
            row = next(r for r in ROWS if f"【题干】\n{r['question']}\n\n" in prompt)
            status, text = JUDGE_REPLIES[row["id"] % 4]
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]} if text
                              else {"error": "boom"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 64  # several judge requests in flight; the default backlog of 5 can drop some

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", prompts
    server.shutdown()
    server.server_close()


def test_judge_mode_against_a_stub_endpoint(random_ckpt, tmp_path, judge_server):
    url, prompts = judge_server
    report = run(random_ckpt, tmp_path, "--mode", "judge", "--max-new-tokens", 4, "--batch-size", 8,
                 "--judge-base-url", url, "--judge-model", "stub", "--judge-max-retries", 0,
                 "--judge-concurrency", 3)
    records = {r["id"]: r for r in read(tmp_path / "judge.predictions.jsonl")}
    assert sorted(records) == IDS and len(prompts) == len(IDS)
    for row in ROWS:
        r, kind = records[row["id"]], row["id"] % 4
        stem_only = T.chat([{"role": "user", "content": row["question"]}])
        assert r["prompt_hash"] == hashlib.sha256(stem_only.encode()).hexdigest()[:16]
        assert r["correct"] == {0: True, 1: False, 2: None, 3: None}[kind]
        assert r["skipped"] == {0: None, 1: None, 2: "judge_unparseable", 3: "judge_http_500"}[kind]
        prompt = next(p for p in prompts if f"【题干】\n{row['question']}\n\n" in p)
        gold = "；".join(row["options"][letter] for letter in row["answer"])
        assert f"【标准答案】\n{gold}\n\n【考生回答】\n" in prompt
    counts = [sum(row["id"] % 4 == k for row in ROWS) for k in range(4)]  # ids 0-28: 8, 7, 7, 7
    assert report["protocol"] == "judge" and report["no_answer"] is None
    assert (report["scored"], report["overall"]["correct"]) == (counts[0] + counts[1], counts[0])
    assert report["skipped"] == {"judge_unparseable": counts[2], "judge_http_500": counts[3]}


def test_parse_verdict():
    assert E.parse_verdict("理由……\n判定：正确") is True
    assert E.parse_verdict("判定: 错误") is False  # half-width colon
    assert E.parse_verdict("<think>判定：正确吗？</think>\n判定：错误") is False  # the verdict after the thinking
    assert E.parse_verdict("无法判断") is None


def test_cot_through_a_server_equals_model_generate(random_ckpt, tmp_path):
    """cot mode with --base-url (tests/completion_server.py serving the checkpoint, as vLLM would): the same
    greedy outputs, answers and report as model.generate in this process."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "completion_server.py"), "--model",
                               str(random_ckpt), "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                T.served_models(url)
                break
            except T.TeacherError:
                __import__("time").sleep(0.5)
        served = run(random_ckpt, tmp_path / "served", "--max-new-tokens", 6, "--limit", 12, "--base-url", url)
    finally:
        server.terminate()
        server.wait()
    ours = run(random_ckpt, tmp_path / "ours", "--max-new-tokens", 6, "--limit", 12)
    keep = ("id", "output", "extracted", "correct", "finished", "prompt_hash")
    a, b = (sorted(({k: r[k] for k in keep} for r in read(tmp_path / d / "cot.predictions.jsonl")),
                   key=lambda r: r["id"]) for d in ("served", "ours"))
    assert a == b and len(a) == 12
    assert served["overall"] == ours["overall"]
    assert json.loads((tmp_path / "served" / "cot.run.json").read_text())["server"] == url
