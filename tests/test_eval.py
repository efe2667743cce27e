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
import zlib
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
VAL = SHARED / "data" / "cmexam" / "val.csv"


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
        assert set(r["extracted"]) <= set(row["options"])
        assert r["correct"] == (r["extracted"] == row["answer"] and r.get("finished", True))
        if mode == "cot":
            assert text == T.chat(T.student_messages(row)) and 1 <= r["new_tokens"] <= 5
            assert r["extracted"] == T.extract_answer(r["output"])
        else:
            assert text.endswith("<|im_start|>assistant\n答案：") and T.format_question(row) in text
            assert set(r["probs"]) == set(row["options"])  # no multi-letter tokens in a byte tokenizer
            assert len(r["extracted"]) == 1 if len(row["answer"]) == 1 else len(r["extracted"]) >= 2
            assert math.isclose(r["answer_mass"], sum(r["probs"].values()), abs_tol=1e-5)
    if mode == "direct":
        assert report["answer_mass_mean"] == pytest.approx(sum(r["answer_mass"] for r in records) / len(records))
    assert sum(c.get("predicted", 0) for c in report["letters"].values()) == sum(len(r["extracted"]) for r in records)
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
    report = E.score(HAND_PREDICTIONS, hand_rows(), dropped=[("line 9", "no answer"), ("line 12", "no options")])
    assert report["protocol"] == "cot" and report["questions"] == 9
    assert (report["scored"], report["missing"], report["skipped"]) == (7, 1, {"prompt_too_long": 1})
    # Right: ids 0, 2 (CA == AC), 8. Id 5 has the right letter but hit --max-new-tokens: wrong.
    # Wilson 95% for 3/7 by hand (z = 1.959964): center (3 + z^2/2) / (7 + z^2) = 4.920729 / 10.841459 = 0.453881,
    # half z / (7 + z^2) * sqrt(3 * 4 / 7 + z^2 / 4) = 0.180783 * 1.635436 = 0.295661.
    assert report["overall"] == {"n": 7, "correct": 3, "accuracy": pytest.approx(3 / 7), "ci95": pytest.approx(
        [0.158220, 0.749542], abs=2e-6)}
    n_correct = lambda s: (s["n"], s["correct"])  # noqa: E731
    assert n_correct(report["strict"]) == (9, 3)  # the skipped id 6 and the missing id 7 count wrong
    assert n_correct(report["finished_only"]) == (6, 3)  # id 5 left out
    assert report["dropped_at_load"] == {"n": 2, "reasons": {"no answer": 1, "no options": 1}}
    # letters over the 7 scored: gold A in 0 2 3 8, B in 1 8, C in 2 3 8, D in 4, E in 5; predicted A 0 2 3 8,
    # B 8, C 1 2 8, E 5 (id 4 answered nothing)
    assert report["letters"] == {"A": {"gold": 4, "predicted": 4}, "B": {"gold": 2, "predicted": 1},
                                 "C": {"gold": 3, "predicted": 3}, "D": {"gold": 1}, "E": {"gold": 1, "predicted": 1}}
    assert report["answer_mass_mean"] is None and report["needs_options"]["needs"]["n"] == 0
    assert n_correct(report["answer_type"]["single"]) == (4, 1)  # ids 0 1 4 5: 0 right
    assert n_correct(report["answer_type"]["multiple"]) == (3, 2)  # ids 2 3 8: CA == AC right, A != AC
    assert set(report["columns"]) == {"Disease Group", "Difficulty level"}
    assert {v: n_correct(s) for v, s in report["columns"]["Disease Group"].items()} == {"呼吸": (4, 2), "循环": (3, 1)}
    difficulty = report["columns"]["Difficulty level"]
    assert {v: n_correct(s) for v, s in difficulty.items()} == {"1": (4, 3), "2": (2, 0), "(missing)": (1, 0)}
    assert list(difficulty) == ["1", "2", "(missing)"]  # largest group first
    # Wilson 95% by hand: 3/4 -> center (3 + z^2/2) / (4 + z^2) = 0.62753, half z / (4 + z^2) * sqrt(3/4 + z^2/4)
    # = 0.32689; 0/2 -> [0, (z^2) / (2 + z^2)] = [0, 0.65762].
    assert difficulty["1"]["ci95"] == pytest.approx([0.300642, 0.954413], abs=1e-6)
    assert difficulty["2"]["ci95"] == pytest.approx([0.0, 0.657620], abs=1e-6)
    assert report["no_answer"] == {"n": 1, "share": pytest.approx(1 / 7)}
    assert report["truncated"]["n"] == 1
    table = E.format_report(report)
    assert "42.9" in table and "呼吸" in table and "skipped prompt_too_long: 1" in table and "MISSING" in table
    assert "33.3% of 9" in table and "50.0% of 6" in table and "rows dropped at load: 2" in table


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
    # the authors' judge is restricted to the ids of "1" and "2" (QwQ-32B shares this vocabulary)
    assert [tok.encode(x, add_special_tokens=False).ids for x in "12"] == [[i] for i in E.AUTHORS_VERDICT_IDS]


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
    writes, append = [], E.append_jsonl

    def crash_after_seven(f, rec):
        if len(writes) == 7:
            raise KeyboardInterrupt
        writes.append(rec["id"])
        append(f, rec)

    monkeypatch.setattr(E, "append_jsonl", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run(random_ckpt, tmp_path, "--mode", "direct", "--batch-size", 4)
    monkeypatch.setattr(E, "append_jsonl", append)
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
    with pytest.raises(T.UserError, match="other settings"):
        run(random_ckpt, tmp_path, "--limit", 2, "--max-new-tokens", 4)


# ----------------------------------------------------------------------------------------------------------------
# Both judge protocols against a stub OpenAI-compatible judge that answers right / wrong / garbage / HTTP 500. The
# authors' prompts (Processingfiles/ForTest.py and ForJudge.py of github destinybird/SP-Huatuo) are transcribed
# here from their scripts, not taken from E.

AUTHORS_STUDENT = ("你是一位医学专家，请先深呼吸，然后用中文一步一步地思考并回答这个问题，给出分点罗列的解释："
                   "问题：{q}？只解释这一个问题即可")
AUTHORS_JUDGE = ("这是一位小模型对问题的回复内容，根据其内容判断其是否做到了正确回复。问题：{q}？答案是：{a}，小模型回复：{r}。"
                 "如果正确，则只直接回复1。如果错误，则只直接回复2")
JUDGE_PREFIX = AUTHORS_JUDGE.split("{q}")[0]


@pytest.fixture
def stub_judge():
    """start(behave) -> (url, bodies): an OpenAI-compatible /v1/chat/completions whose reply to each request is
    behave(row, prompt, body) -> (status, content); row is the question the judge prompt is about."""
    servers = []

    def start(behave):
        bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                bodies.append(body)
                row = next(r for r in ROWS if prompt.startswith(f"{JUDGE_PREFIX}{r['question']}？答案是：")
                           or f"【题干】\n{r['question']}\n\n" in prompt)
                status, content = behave(row, prompt, body)
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": "boom"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 64

        servers.append(Server(("127.0.0.1", 0), Handler))
        threading.Thread(target=servers[-1].serve_forever, args=(0.02,), daemon=True).start()
        return f"http://127.0.0.1:{servers[-1].server_address[1]}", bodies
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


JUDGE_REPLIES = {0: (200, "<think>先想想。判定：错误</think>\n回答与标准答案一致。\n判定：正确"),
                 1: (200, "回答的诊断与标准答案不同。\n判定：错误"), 2: (200, "我觉得还行吧"), 3: (500, None)}


def test_judge_mode_against_a_stub_endpoint(random_ckpt, tmp_path, stub_judge):
    url, bodies = stub_judge(lambda row, prompt, body: JUDGE_REPLIES[row["id"] % 4])
    report = run(random_ckpt, tmp_path, "--mode", "judge", "--judge-protocol", "rubric", "--max-new-tokens", 4,
                 "--batch-size", 8,
                 "--judge-base-url", url, "--judge-model", "stub", "--judge-max-retries", 0,
                 "--judge-concurrency", 3)
    records = {r["id"]: r for r in read(tmp_path / "judge.predictions.jsonl")}
    prompts = [body["messages"][-1]["content"] for body in bodies]
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
    assert report["protocol"] == "judge/rubric" and report["no_answer"] is None
    assert (report["scored"], report["overall"]["correct"]) == (counts[0] + counts[1], counts[0])
    assert report["skipped"] == {"judge_unparseable": counts[2], "judge_http_500": counts[3]}


def test_parse_verdict():
    assert E.parse_verdict("理由……\n判定：正确") is True
    assert E.parse_verdict("判定: 错误") is False  # half-width colon
    assert E.parse_verdict("<think>判定：正确吗？</think>\n判定：错误") is False  # the verdict after the thinking
    assert E.parse_verdict("无法判断") is None


def test_parse_token_verdict():
    assert E.parse_token_verdict("1") is True and E.parse_token_verdict(" 2\n") is False
    assert E.parse_token_verdict("<think>\n1\n</think>\n\n") is True  # a reasoning parser filed the token as thinking
    for text in ("12", "1。", "正确", "", "3"):
        assert E.parse_token_verdict(text) is None


def authors_args(url, *extra):
    return ["--mode", "judge", "--judge-base-url", url, "--judge-model", "stub", "--judge-max-retries", 0,
            "--judge-concurrency", 3, *extra]


def test_authors_protocol_exact_requests_and_failures_rejudged_on_resume(random_ckpt, tmp_path, stub_judge,
                                                                         monkeypatch):
    url, bodies = stub_judge(lambda row, prompt, body: {0: (200, "1"), 1: (200, "2"), 2: (200, "好的"),
                                                        3: (500, None)}[row["id"] % 4])
    report = run(random_ckpt, tmp_path, *authors_args(url, "--max-new-tokens", 4, "--batch-size", 8))
    records = {r["id"]: r for r in read(tmp_path / "judge.predictions.jsonl")}
    assert sorted(records) == IDS and len(bodies) == len(IDS)
    for row in ROWS:
        r = records[row["id"]]
        student = AUTHORS_STUDENT.format(q=row["question"])  # a raw prompt: no chat template
        assert r["prompt_hash"] == hashlib.sha256(student.encode()).hexdigest()[:16]
        assert r["judge_protocol"] == "authors"
        gold = "；".join(row["options"][letter] for letter in row["answer"])
        body, = [b for b in bodies if b["messages"][-1]["content"].startswith(f"{JUDGE_PREFIX}{row['question']}？")]
        assert body == {"model": "stub", "temperature": 0.01, "top_p": 1.0, "max_tokens": 1, "top_k": 2,
                        "allowed_token_ids": [16, 17], "messages": [
                            {"role": "system", "content": "You are a helpful assistant."},
                            {"role": "user", "content": AUTHORS_JUDGE.format(q=row["question"], a=gold,
                                                                             r=r["output"].strip())}]}
        kind = row["id"] % 4
        assert (r["correct"], r["skipped"]) == [(True, None), (False, None), (None, "judge_unparseable"),
                                                (None, "judge_http_500")][kind]
    counts = [sum(row["id"] % 4 == k for row in ROWS) for k in range(4)]  # ids 0-28: 8, 7, 7, 7
    assert report["protocol"] == "judge/authors" and report["overall"]["correct"] == counts[0]
    assert report["skipped"] == {"judge_unparseable": counts[2], "judge_http_500": counts[3]}
    assert report["strict"] == {"n": 29, "correct": counts[0], "accuracy": pytest.approx(counts[0] / 29),
                                "ci95": pytest.approx(E.wilson(counts[0], 29))}

    # The same command again, the judge now well: only the 14 failures are judged again, from the stored replies.
    before = {r["id"]: r["output"] for r in read(tmp_path / "judge.predictions.jsonl")}
    url2, bodies2 = stub_judge(lambda row, prompt, body: (200, "1"))
    monkeypatch.setattr(E, "generate", lambda *a, **k: pytest.fail("nothing may be generated again"))
    report = run(random_ckpt, tmp_path, *authors_args(url2, "--max-new-tokens", 4, "--batch-size", 8))
    assert len(bodies2) == counts[2] + counts[3] and report["skipped"] == {} and report["scored"] == 29
    after = read(tmp_path / "judge.predictions.jsonl")
    assert {r["id"]: r["output"] for r in after} == before and len(after) == 29
    assert report["overall"]["correct"] == counts[0] + counts[2] + counts[3]


def test_authors_protocol_defaults_and_echo(random_ckpt, tmp_path, stub_judge):
    url, bodies = stub_judge(lambda row, prompt, body: (200, "2"))
    run(random_ckpt, tmp_path, *authors_args(url, "--limit", 2, "--judge-allowed-token-ids", "none"))
    settings = json.loads((tmp_path / "judge.run.json").read_text())
    assert (settings["max_new_tokens"], settings["temperature"], settings["top_p"]) == (450, 0.7, 0.9)
    assert (settings["judge_temperature"], settings["judge_max_tokens"], settings["judge_extra"]) == (0.01, 1, {})
    assert all("allowed_token_ids" not in b and "top_k" not in b for b in bodies) and len(bodies) == 2
    # ForJudge.py keeps only what follows an echoed "只解释这一个问题即可"
    row = ROWS[0]
    messages = E.judge_messages(row, "  问题：……只解释这一个问题即可\n1. 出血量决定。  ", "authors")
    assert messages[1]["content"] == AUTHORS_JUDGE.format(q=row["question"], a="出血量", r="1. 出血量决定。")


def test_judge_calibration_against_exact_match(tmp_path, stub_judge):
    rows = {row["id"]: row for row in ROWS}
    cot = []
    for i in range(8):  # exact match right for even ids, wrong for odd; id 6 skipped, id 7 cut off: not known
        row = rows[i]
        letter = row["answer"] if i % 2 == 0 else next(x for x in row["options"] if x not in row["answer"])
        cot.append(mc(i, letter, row["answer"], output=f"<think>\n……\n</think>\n答案：{letter}", finished=i != 7,
                      skipped="prompt_too_long" if i == 6 else None))
    (tmp_path / "cot").mkdir()
    (tmp_path / "cot" / "cot.predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                                    for r in cot), encoding="utf-8")

    def judge(row, prompt, body):  # agrees with exact match, except that it passes id 3
        return 200, "1" if f"答案：{row['answer']}。" in prompt or row["id"] == 3 else "2"
    url, bodies = stub_judge(judge)
    result = E.main(["--mode", "judge", "--data", str(SAMPLE_CSV), "--out", str(tmp_path / "cal"), "--judge-calibrate",
                     str(tmp_path / "cot"), "--judge-base-url", url, "--judge-model", "stub"])
    assert len(bodies) == 6
    # By hand over ids 0-5: judge right & exact right 0 2 4, judge right & exact wrong 3, judge wrong & exact wrong
    # 1 5. Agreement 5/6; chance (4/6)(3/6) + (2/6)(3/6) = 1/2, so kappa (5/6 - 1/2) / (1/2) = 2/3.
    assert {k: result[k] for k in ("judged", "judge_failures", "judge_right_exact_right", "judge_right_exact_wrong",
                                   "judge_wrong_exact_right", "judge_wrong_exact_wrong")} == {
        "judged": 6, "judge_failures": 0, "judge_right_exact_right": 3, "judge_right_exact_wrong": 1,
        "judge_wrong_exact_right": 0, "judge_wrong_exact_wrong": 2}
    assert result["agreement"] == pytest.approx(5 / 6) and result["kappa"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "cal" / "judge-authors.calibration.json").read_text())["judged"] == 6


# ----------------------------------------------------------------------------------------------------------------
# Paired comparison against a published table: Cavo et al. 2012 as worked in Fagerland, Lydersen & Laake,
# "Statistical Analysis of Contingency Tables" (2017), chapter 8: 59 both, 6 only A, 16 only B, 80 neither;
# Newcombe's square-and-add interval -0.0621 (-0.1186 to -0.0046).

def cavo(shift=0):
    cells = [(True, True)] * 59 + [(True, False)] * 6 + [(False, True)] * 16 + [(False, False)] * 80
    a = [mc(i + shift, "A" if x else "B", "A") for i, (x, _) in enumerate(cells)]
    b = [mc(i + shift, "A" if y else "B", "A") for i, (_, y) in enumerate(cells)]
    return a, b


def test_compare_predictions_hand_computed():
    a, b = cavo()
    a += [mc(500, "A", "A"), mc(501, "A", "A")]  # only in A
    b += [mc(500, "A", "A", skipped="prompt_too_long"), mc(600, "A", "A")]  # skipped in B; only in B
    c = E.compare_predictions(a, b)
    assert {k: c[k] for k in ("protocol", "n", "both_right", "only_a", "only_b", "neither", "only_in_a",
                              "only_in_b", "skipped_a", "skipped_b")} == {
        "protocol": "cot", "n": 161, "both_right": 59, "only_a": 6, "only_b": 16, "neither": 80, "only_in_a": 1,
        "only_in_b": 1, "skipped_a": 0, "skipped_b": 1}
    assert (c["accuracy_a"], c["accuracy_b"]) == (pytest.approx(65 / 161), pytest.approx(75 / 161))
    assert c["difference"] == pytest.approx(-10 / 161) and c["ci95"] == pytest.approx([-0.1186, -0.0046], abs=5e-5)
    # Exact McNemar by hand: 2 * sum_{i<=6} C(22, i) / 2^22 = 2 * (1+22+231+1540+7315+26334+74613) / 4194304
    assert c["mcnemar_p"] == 2 * 110056 / 2 ** 22
    scipy_stats = pytest.importorskip("scipy.stats")  # an independent oracle for the binomial test
    assert c["mcnemar_p"] == pytest.approx(scipy_stats.binomtest(6, 22, 0.5).pvalue, rel=1e-12)
    swapped = E.compare_predictions(b, a)
    assert swapped["difference"] == pytest.approx(10 / 161) and swapped["mcnemar_p"] == c["mcnemar_p"]
    assert swapped["ci95"] == pytest.approx([0.0046, 0.1186], abs=5e-5)
    same = E.compare_predictions(a, a)
    assert (same["only_a"], same["only_b"], same["mcnemar_p"], same["difference"]) == (0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="protocols"):
        E.compare_predictions(a, [mc(0, "A", "A", mode="direct")])
    with pytest.raises(ValueError, match="gold"):
        E.compare_predictions(a, [mc(0, "A", "B")])


def test_compare_command_line(tmp_path, capsys):
    a, b = cavo()
    b[0]["finished"] = False  # a truncated reply scores wrong: one "both right" becomes "only A"
    for name, preds in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cot.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preds))
    result = E.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b" / "cot.predictions.jsonl"),
                     "--out", str(tmp_path / "cmp")])
    assert (result["both_right"], result["only_a"], result["only_b"]) == (58, 7, 16)
    printed = capsys.readouterr().out
    assert "A right" in printed and "McNemar" in printed and json.loads(printed.splitlines()[-1]) == result
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text()) == result
    (tmp_path / "a" / "direct.predictions.jsonl").write_text("")
    with pytest.raises(SystemExit, match="expected one"):
        E.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b")])


# ----------------------------------------------------------------------------------------------------------------
# Broken checkpoints, seeds, questions that need their options

def test_nonfinite_weights_and_scores_are_refused(tmp_path):
    ckpt = checkpoint(tmp_path / "nan", setup=lambda m: m.layers[1].mlp.down_proj.weight[0, 0].fill_(float("nan")))
    with pytest.raises(T.UserError, match="non-finite weights"):
        run(ckpt, tmp_path / "out", "--mode", "direct", "--limit", 2)
    assert not (tmp_path / "out" / "direct.predictions.jsonl").exists()
    rec = mc(0, "A", "A", mode="direct", answer_mass=float("nan"), probs={"A": float("nan")})
    with pytest.raises(ValueError, match="non-finite"):
        E.score([rec], hand_rows())


def test_sampling_seed_per_batch_and_sample_seed_apart(random_ckpt, tmp_path, monkeypatch):
    seeds, real = [], E.generate
    monkeypatch.setattr(E, "generate", lambda *a, **k: seeds.append(k["seed"]) or real(*a, **k))
    run(random_ckpt, tmp_path / "t", "--temperature", 0.8, "--seed", 5, "--batch-size", 8, "--max-new-tokens", 2)
    order = sorted(ROWS, key=lambda r: -len(TOK.encode(E.prompt_text(r, "cot"), add_special_tokens=False).ids))
    assert seeds == [zlib.crc32(repr((5, order[i]["id"])).encode()) for i in range(0, len(order), 8)]
    assert len(set(seeds)) == len(seeds) == 4
    picked = {row["id"] for row in E.select_rows(SAMPLE_CSV, sample=6, seed=1)}
    assert picked != {row["id"] for row in E.select_rows(SAMPLE_CSV, sample=6, seed=2)}
    for seed in (0, 7):  # --seed does not move the subset
        run(random_ckpt, tmp_path / f"d{seed}", "--mode", "direct", "--sample", 6, "--sample-seed", 1, "--seed", seed)
        assert {r["id"] for r in read(tmp_path / f"d{seed}" / "direct.predictions.jsonl")} == picked


def test_questions_that_need_their_options():
    options = dict(zip("ABCDE", ["甲", "乙", "以上都是", "A+B", "均不是"]))
    row = lambda q, answer: {"id": 0, "question": q, "options": options, "answer": answer}  # noqa: E731
    assert E.needs_options(row("下列哪项是正确的", "A")) == (True, False)
    assert E.needs_options(row("最可能的诊断是", "C")) == (False, True)
    assert E.needs_options(row("最可能的诊断是", "D")) == (False, True)
    assert E.needs_options(row("最可能的诊断是", "E")) == (False, True)
    assert E.needs_options(row("最可能的诊断是", "AB")) == (False, False)
    if VAL.is_file():  # 12% of the real val split point at their options
        rows = T.load_cmexam(VAL)
        assert sum(E.needs_options(r)[0] for r in rows) == 822 and len(rows) == 6810


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
