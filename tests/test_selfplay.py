"""selfplay.py: pairs from self-correction, dedup, resume, hint, zero teacher calls, the rounds driver.

Most tests swap selfplay.sample_texts (the one function that calls the model) for a scripted sampler whose outputs
are written here, so the exact pairs that must result can be decided by hand. Others run the real sampler on a
tiny random Qwen2 model with a tiny byte-level BPE tokenizer that has Qwen's special tokens.
"""
import ast
import json
import random
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import selfplay as S
import templates as T

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CSV = Path(__file__).resolve().parent / "data" / "cmexam_sample.csv"
FAKE_DPO = Path(__file__).resolve().parent / "selfplay_fake_dpo.py"
CONTEXT = 4096  # the tiny model's max_position_embeddings


def traj(note, letter):
    """A well-formed trajectory (our output format) that answers `letter`."""
    return f"<think>\n{note}\n</think>\n依据如上。\n答案：{letter}"


def critique(solution, marked=True):
    return f"原解答第二步把知识记错了。\n{T.CORRECTION_MARK if marked else ''}\n{solution}"


@pytest.fixture(scope="module")
def rows():
    return T.load_cmexam(SAMPLE_CSV)


@pytest.fixture(scope="module")
def tokenizer(rows):
    """A miniature byte-level BPE that keeps Qwen's special tokens (at other ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([T.chat(T.critique_messages(row, traj("想", "A"))) for row in rows], trainer)
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random Qwen2 checkpoint folder with the tokenizer beside it, as sft.py would leave one."""
    path = tmp_path_factory.mktemp("tiny_model")
    cfg = M.ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT)
    M.save(M.init_weights(M.Transformer(cfg), seed=1), path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text("utf-8").splitlines()]


class Scripted:
    """Stands in for selfplay.sample_texts: identifies each prompt's question (and, for critique prompts, the
    trajectory being critiqued) by decoding it, and returns the outputs scripted for it."""

    def __init__(self, tokenizer, rows, student, corrections):
        self.tokenizer, self.rows = tokenizer, rows
        self.student, self.corrections = student, corrections  # {id: [(text, finished)]}, {wrong text: [...]}
        self.prompts, self.seeds = [], []

    def question(self, text):
        [row] = [row for row in self.rows if f"\n{row['question']}\n" in text]
        return row

    def __call__(self, model, tokenizer, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
        self.seeds.append(seed)
        results = []
        for ids in prompts:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self.prompts.append(text)
            if "【原解答】" in text:
                wrong = text.split("【原解答】\n")[1].split("\n【原解答结束】")[0]
                outputs = self.corrections[wrong]
            else:
                outputs = self.student[self.question(text)["id"]]
            assert len(outputs) == num_samples
            results.append([(out, done, len(self.tokenizer.encode(out).ids)) for out, done in outputs])
        return results


# ----------------------------------------------------------------------------------------------------------------
# The hand-decided script: five questions, k = 3 samples, m = 2 corrections.

LONG_WRONG = traj("z" * 5000, "C")  # its critique prompt cannot fit the context with any reply
NO_ANSWER = "<think>\n想不出\n</think>\n不知道"


def script(rows):
    q0, q1, q2, q3, q4 = (rows[i] for i in (0, 1, 3, 28, 18))
    assert (q0["answer"], q1["answer"], q2["answer"], q4["answer"]) == ("C", "E", "B", "A")
    student = {
        q0["id"]: [(traj("q0 对", "C"), True), (traj("q0 错", "A"), True), ("<think>\n初步答案：B", False)],
        q1["id"]: [(NO_ANSWER, True), (traj("q1 错", "D"), True), (traj("q1 错", "D"), True)],
        q2["id"]: [(traj("q2 对", "B"), True), (traj("q2 也对", "B"), True), ("<think>\n答案：B", False)],
        q3["id"]: [],  # skipped: prompt + max_new_tokens exceeds the context
        q4["id"]: [(LONG_WRONG, True), (traj("q4 对", "A"), True), (traj("q4 也对", "A"), True)],
    }
    corrections = {
        traj("q0 错", "A"): [(critique(traj("q0 改", "C")), True), (critique("答案：C", marked=False), True)],
        NO_ANSWER: [(critique("答案：E"), True), (critique(traj("q1 改错", "A")), True)],
        traj("q1 错", "D"): [(critique(traj("q1 改", "E")), True), (critique(traj("q1 改", "E")), True)],
    }
    return [q0, q1, q2, q3, q4], student, corrections


def scripted_run(tmp_path, rows, tokenizer, model_dir, monkeypatch, **overrides):
    questions, student, corrections = script(rows)
    sampler = Scripted(tokenizer, questions, student, corrections)
    monkeypatch.setattr(S, "sample_texts", sampler)
    q3_length = len(S.prompt_ids(tokenizer, T.student_messages(questions[3])))
    others = max(len(S.prompt_ids(tokenizer, T.student_messages(q))) for q in questions if q is not questions[3])
    assert others < q3_length
    cfg = S.SelfPlayConfig(samples=3, corrections=2, max_new_tokens=CONTEXT - q3_length + 1,
                           critique_max_new_tokens=1000, chunk_size=2, **overrides)
    summary = S.run_round(model_dir, tokenizer, questions, tmp_path, cfg)
    return questions, sampler, summary


def test_scripted_run_makes_exactly_the_hand_decided_pairs(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    (q0, q1, q2, q3, q4), _, summary = scripted_run(tmp_path, rows, tokenizer, model_dir, monkeypatch)
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    got = [(p["id"], p["source"], p["sample"], p["correction"], p["chosen"][0]["content"],
            p["rejected"][0]["content"]) for p in pairs]
    # q0: sample 1 corrected by its first critique; the second has no mark. Sample 2 was cut off: not corrected.
    # q1: sample 0's right correction is malformed (no <think>), its other one wrong; samples 1 and 2 are the same
    #     text with the same two corrections: one pair, three duplicates. q4: sample 0's critique is too long.
    assert got == [(q0["id"], "correction", 1, 0, traj("q0 改", "C"), traj("q0 错", "A")),
                   (q1["id"], "correction", 1, 0, traj("q1 改", "E"), traj("q1 错", "D"))]
    for pair, row, wrong in zip(pairs, (q0, q1), ("A", "D")):
        assert pair["prompt"] == [{"role": "user", "content": T.format_question(row) + "\n\n" + T.OUTPUT_FORMAT}]
        assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
        assert (pair["round"], pair["hint"], pair["answer"]) == (1, False, row["answer"])
        assert pair["rejected_answer"] == wrong

    assert {k: summary[k] for k in summary if k not in ("model", "generated_tokens")} == {
        "round": 1, "questions": 4, "questions_skipped_too_long": 1, "samples": 12,
        "accuracy_per_sample": 0.5,  # q0 1, q1 0, q2 3 (one of them cut off, yet its answer is right), q4 2
        "questions_all_samples_right": 0.25, "questions_any_sample_right": 0.75,
        "no_answer": 1, "truncated": 2, "wrong_samples_sent_to_critique": 5, "critique_skipped_too_long": 1,
        "correction_attempts": 8, "corrections_right": 6, "correction_success_rate": 0.75,
        "wrong_samples_corrected": 4, "corrections_unmarked": 1, "corrections_malformed": 1,
        "corrections_truncated": 0, "corrections_reemitted": 0, "corrections_right_dropped_prompt_reference": 0,
        "pairs": 2, "pairs_by_source": {"correction": 2}, "duplicate_pairs_dropped": 3,
        "teacher_calls": 0}
    assert summary["generated_tokens"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["pairs"] == 2
    records = {r["id"]: r for r in read_jsonl(tmp_path / "samples.jsonl")}
    assert records[q3["id"]]["skipped"] == "too_long" and records[q3["id"]]["samples"] == []
    assert [s["predicted"] for s in records[q0["id"]]["samples"]] == ["C", "A", "B"]
    assert [c["predicted"] for c in records[q0["id"]]["samples"][1]["corrections"]] == ["C", ""]
    # the texts are kept, so every pair and every failure can be read back (and re-corrected by a teacher)
    assert records[q0["id"]]["samples"][1]["text"] == traj("q0 错", "A")
    assert records[q0["id"]]["samples"][1]["corrections"][0]["text"] == critique(traj("q0 改", "C"))
    assert records[q4["id"]]["samples"][0]["critique"] == "too_long"
    assert (records[q1["id"]]["pairs"], records[q1["id"]]["duplicates"]) == (1, 3)


def test_corrections_that_refer_to_the_prompt_are_dropped_and_counted(tmp_path, rows, tokenizer, model_dir,
                                                                   monkeypatch):
    q0 = rows[0]
    wrong = traj("q0 错", "A")
    fixes = [traj("原解答第二步错了，改为C", "C"), traj("题目提示正确答案是C，所以", "C"), traj("q0 改", "C")]
    for hint, kept, dropped in ((False, fixes[1:], 1), (True, fixes[2:], 2)):
        sampler = Scripted(tokenizer, [q0], {q0["id"]: [(wrong, True)]},
                           {wrong: [(critique(fix), True) for fix in fixes]})
        monkeypatch.setattr(S, "sample_texts", sampler)
        cfg = S.SelfPlayConfig(samples=1, corrections=3, hint=hint, max_new_tokens=1000, critique_max_new_tokens=1000)
        summary = S.run_round(model_dir, tokenizer, [q0], tmp_path / str(hint), cfg)
        assert [p["chosen"][0]["content"] for p in read_jsonl(tmp_path / str(hint) / "pairs.jsonl")] == kept
        assert summary["corrections_right"] == 3 and summary["corrections_right_dropped_prompt_reference"] == dropped
        record, = read_jsonl(tmp_path / str(hint) / "samples.jsonl")
        assert record["samples"][0]["corrections"][0]["refers_to_prompt"] == "原解答"


def test_trl_reads_the_pairs(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    """TRL's own DPO data path (trl as an oracle) sees our pairs as conversational, with the student prompt."""
    qwen = ROOT.parent / "shared" / "data" / "qwen2.5-tokenizer"
    if not (qwen / "tokenizer.json").is_file():
        pytest.skip("../shared/data/qwen2.5-tokenizer not present")
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational
    (q0, *_), _, _ = scripted_run(tmp_path, rows, tokenizer, model_dir, monkeypatch)
    hf = AutoTokenizer.from_pretrained(str(qwen))
    pair = read_jsonl(tmp_path / "pairs.jsonl")[0]
    assert is_conversational(pair)
    rendered = apply_chat_template({k: pair[k] for k in ("prompt", "chosen", "rejected")}, hf)
    assert rendered == {"prompt": T.chat(T.student_messages(q0)), "chosen": traj("q0 改", "C") + "<|im_end|>\n",
                        "rejected": traj("q0 错", "A") + "<|im_end|>\n"}


def test_sample_source_pairs_right_against_wrong_samples(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    (q0, q1, q2, q3, q4), _, summary = scripted_run(tmp_path, rows, tokenizer, model_dir, monkeypatch,
                                                    sources="correction,sample")
    got = [(p["id"], p["source"], p["sample"], p.get("chosen_sample"), p["chosen"][0]["content"],
            p["rejected"][0]["content"]) for p in read_jsonl(tmp_path / "pairs.jsonl")]
    assert got == [(q0["id"], "correction", 1, None, traj("q0 改", "C"), traj("q0 错", "A")),
                   (q0["id"], "sample", 1, 0, traj("q0 对", "C"), traj("q0 错", "A")),  # not sample 2: cut off
                   (q1["id"], "correction", 1, None, traj("q1 改", "E"), traj("q1 错", "D")),
                   (q4["id"], "sample", 0, 1, traj("q4 对", "A"), LONG_WRONG),
                   (q4["id"], "sample", 0, 2, traj("q4 也对", "A"), LONG_WRONG)]
    assert summary["pairs_by_source"] == {"correction": 2, "sample": 3}


def test_hint_is_shown_only_when_asked_and_recorded(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    for hint in (False, True):
        out = tmp_path / str(hint)
        questions, sampler, _ = scripted_run(out, rows, tokenizer, model_dir, monkeypatch, hint=hint)
        critiques = [p for p in sampler.prompts if "【原解答】" in p]
        assert len(critiques) == 4  # q0's sample 1, q1's samples 0, 1, 2 (q4's sample 0 is too long to send)
        for prompt in critiques:
            gold = sampler.question(prompt)["answer"]
            assert (f"本题的正确答案是{gold}" in prompt) == hint
        assert not any("正确答案是" in p for p in sampler.prompts if "【原解答】" not in p)  # student prompts
        assert all(p["hint"] == hint for p in read_jsonl(out / "pairs.jsonl"))
        assert all(r["hint"] == hint for r in read_jsonl(out / "samples.jsonl"))
        assert json.loads((out / "config.json").read_text())["hint"] == hint
    with pytest.raises(T.UserError, match="hint"):  # a round is never resumed with the other setting
        scripted_run(tmp_path / "False", rows, tokenizer, model_dir, monkeypatch, hint=True)


def test_dedup_within_and_across_questions_and_runs(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    twin = {**rows[1], "id": "twin"}  # the same question under another id: the same pairs, so all duplicates
    data = [rows[1], twin]
    wrong, fixed = traj("错", "D"), traj("改", "E")
    sampler = Scripted(tokenizer, data, {1: [(wrong, True)] * 2, "twin": [(wrong, True)] * 2},
                       {wrong: [(critique(fixed), True)] * 2})
    sampler.question = lambda text: rows[1]  # both ids have one text; the script is the same for both
    sampler.student = {1: sampler.student[1]}
    monkeypatch.setattr(S, "sample_texts", sampler)
    cfg = S.SelfPlayConfig(samples=2, corrections=2, max_new_tokens=16, critique_max_new_tokens=16)
    summary = S.run_round(model_dir, tokenizer, data, tmp_path, cfg)
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert [(p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [(1, fixed, wrong)]
    assert summary["correction_attempts"] == 8 and summary["duplicate_pairs_dropped"] == 7
    assert [(r["id"], r["pairs"], r["duplicates"]) for r in read_jsonl(tmp_path / "samples.jsonl")] == \
        [(1, 1, 3), ("twin", 0, 4)]
    before = (tmp_path / "pairs.jsonl").read_bytes(), (tmp_path / "samples.jsonl").read_bytes()
    monkeypatch.setattr(S, "load", lambda *a, **k: pytest.fail("a finished round must not even load the model"))
    assert S.run_round(model_dir, tokenizer, data, tmp_path, cfg)["pairs"] == 1
    assert ((tmp_path / "pairs.jsonl").read_bytes(), (tmp_path / "samples.jsonl").read_bytes()) == before


# ----------------------------------------------------------------------------------------------------------------
# Resume: a run killed anywhere ends with the same files as one that never stopped.


def random_sampler(tokenizer, rows):
    """Scripted outputs drawn from random.Random(seed): the files only match if resumed chunks get their seeds."""
    def sample(model, tok, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
        results = []
        for p, ids in enumerate(prompts):
            rng = random.Random(f"{seed}/{p}")
            text = tokenizer.decode(ids, skip_special_tokens=False)
            if "【原解答】" in text:
                outs = [critique(traj(f"改{rng.random()}", rng.choice("ABCDE"))) for _ in range(num_samples)]
            else:
                outs = [traj(f"想{rng.random()}", rng.choice("ABCDE")) for _ in range(num_samples)]
            results.append([(out, True, 5) for out in outs])
        return results
    return sample


def test_killed_run_resumes_to_the_same_files(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    data = rows[:9]
    cfg = S.SelfPlayConfig(samples=3, corrections=2, max_new_tokens=16, critique_max_new_tokens=16, chunk_size=2,
                           sources="correction,sample")
    monkeypatch.setattr(S, "sample_texts", random_sampler(tokenizer, data))
    S.run_round(model_dir, tokenizer, data, tmp_path / "whole", cfg)
    whole = read_jsonl(tmp_path / "whole" / "pairs.jsonl")
    assert len(whole) >= 10 and len({p["source"] for p in whole}) == 2  # enough pairs for the test to mean much

    out, real_append, real_run_chunk = tmp_path / "killed", S.append_jsonl, S.run_chunk
    # Lines each run writes before it dies: 5 = chunk 2 midway through its pairs; 6 = its pairs and one of its two
    # records (a chunk half committed); 4 = later chunks.
    for kill_after in (5, 6, 4):
        writes = []

        def dying_append(f, record):
            if len(writes) == kill_after:
                raise KeyboardInterrupt
            writes.append(record)
            real_append(f, record)
        monkeypatch.setattr(S, "append_jsonl", dying_append)
        with pytest.raises(KeyboardInterrupt):
            S.run_round(model_dir, tokenizer, data, out, cfg)
        with open(out / "pairs.jsonl", "a", encoding="utf-8") as f:
            f.write('{"prompt": [{"role": "user", "content": "半')  # and a write cut off by the kill
    monkeypatch.setattr(S, "append_jsonl", real_append)
    chunks_run = []
    monkeypatch.setattr(S, "run_chunk", lambda model, tok, chunk, *a: chunks_run.append(chunk) or
                        real_run_chunk(model, tok, chunk, *a))
    S.run_round(model_dir, tokenizer, data, out, cfg)
    assert len(chunks_run) < 5  # committed chunks are not sampled again
    for name in ("pairs.jsonl", "samples.jsonl", "summary.json"):
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


# ----------------------------------------------------------------------------------------------------------------
# The real sampler on a tiny random model: nothing scripted.


def test_sample_texts_batches_by_length_and_returns_input_order(tokenizer, model_dir):
    model = M.load(model_dir)
    stop = (T.special_ids(tokenizer)["im_end"], T.special_ids(tokenizer)["endoftext"])
    # Random prompts of whole characters: a tiny random model's greedy reply depends on the prompt's end.
    clean = [i for i in range(3, 500) if "\ufffd" not in tokenizer.decode([i])]
    rng = random.Random(0)
    prompts = [[rng.choice(clean) for _ in range(n)] for n in (9, 3, 7, 12, 5)]
    prompts[2][-1] = stop[0]  # this model then repeats <|im_end|>: a reply that finishes at once
    cfg = S.SelfPlayConfig(temperature=0.0, batch_size=2)  # greedy: a row's output does not depend on its batch
    got = S.sample_texts(model, tokenizer, prompts, 2, 12, cfg, seed=0)
    expected = []
    for prompt in prompts:
        [alone] = M.generate(model, [prompt], 12, stop_ids=stop)
        finished = alone[-1] in stop
        expected.append([(tokenizer.decode(alone[:-1] if finished else alone, skip_special_tokens=False),
                          finished, len(alone))] * 2)
    assert got == expected
    assert len({samples[0] for samples in got}) == 5 and sum(samples[0][1] for samples in got) == 1


def test_real_model_run_writes_well_formed_records(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    lengths = [len(S.prompt_ids(tokenizer, T.student_messages(row))) for row in rows[:6]]
    longest = max(lengths)
    assert lengths.count(longest) == 1
    cfg = S.SelfPlayConfig(samples=2, corrections=2, max_new_tokens=CONTEXT - longest + 1, chunk_size=4,
                           batch_size=3, temperature=1.0, top_p=1.0)
    # Sampling that long would be slow: the sampler really runs, but only 6 new tokens are drawn per row.
    real = S.sample_texts
    monkeypatch.setattr(S, "sample_texts", lambda m, t, p, n, max_new, c, seed, heads=None:
                        real(m, t, p, n, 6, c, seed))
    summary = S.run_round(model_dir, tokenizer, rows[:6], tmp_path, cfg)
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert [r["id"] for r in records] == [row["id"] for row in rows[:6]]
    for record, length in zip(records, lengths):
        assert set(record) == {"id", "round", "answer", "hint", "skipped", "samples", "pairs", "duplicates"}
        if length == longest:
            assert record["skipped"] == "too_long" and record["samples"] == []
            continue
        assert record["skipped"] is None and len(record["samples"]) == 2
        for s in record["samples"]:
            assert s["right"] == (s["predicted"] == record["answer"]) and 1 <= s["tokens"] <= 6
            assert s["finished"] or s["tokens"] == 6
    assert summary["questions"] == 5 and summary["questions_skipped_too_long"] == 1 and summary["samples"] == 10
    assert summary["teacher_calls"] == 0 and summary["pairs"] == len(read_jsonl(tmp_path / "pairs.jsonl"))


def test_real_corrections_of_scripted_wrong_samples(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    """The critique phase on the real sampler: students are scripted (finished, wrong), critiques are drawn."""
    real, calls = S.sample_texts, []

    def mixed(model, tok, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
        calls.append((len(prompts), num_samples, max_new_tokens))
        if max_new_tokens == cfg.max_new_tokens:
            return [[(traj(f"错{i}", "F"), True, 3) for i in range(num_samples)] for _ in prompts]
        return real(model, tok, prompts, num_samples, max_new_tokens, cfg, seed)
    monkeypatch.setattr(S, "sample_texts", mixed)
    cfg = S.SelfPlayConfig(samples=2, corrections=3, max_new_tokens=20, critique_max_new_tokens=5, batch_size=2)
    summary = S.run_round(model_dir, tokenizer, rows[:3], tmp_path, cfg)
    assert calls == [(3, 2, 20), (6, 3, 5)]  # one chunk: 3 questions' students, then 6 wrong samples x 3
    assert summary["correction_attempts"] == 18 and summary["accuracy_per_sample"] == 0.0
    for record in read_jsonl(tmp_path / "samples.jsonl"):
        for s in record["samples"]:
            assert len(s["corrections"]) == 3
            assert all(1 <= c["tokens"] <= 5 and c["right"] == (c["predicted"] == record["answer"])
                       for c in s["corrections"])


# ----------------------------------------------------------------------------------------------------------------
# Cost: no teacher anywhere in Stage 2.


def test_no_teacher_is_imported_or_called(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    tree = ast.parse((ROOT / "selfplay.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert not imported & {"chat_completion", "TeacherConfig", "distill", "_request_once", "urllib", "http"}

    def refuse(*args, **kwargs):
        raise AssertionError("selfplay contacted a teacher / the network")
    monkeypatch.setattr(T, "chat_completion", refuse)
    monkeypatch.setattr(T, "_request_once", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    questions, sampler, summary = scripted_run(tmp_path, rows, tokenizer, model_dir, monkeypatch)
    assert summary["teacher_calls"] == 0 and summary["pairs"] == 2


# ----------------------------------------------------------------------------------------------------------------
# The command line: --help, shards and merge, the rounds driver.


def test_help():
    out = subprocess.run([sys.executable, str(ROOT / "selfplay.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0
    for flag in ("--rounds", "--samples", "--corrections", "--hint", "--sources", "--dpo-args", "--num-shards",
                 "--correction", "--locate", "--verify"):
        assert flag in out.stdout


def test_bad_command_lines_are_clear_errors(tmp_path, model_dir, capsys):
    base = ["--model", str(model_dir), "--data", str(SAMPLE_CSV), "--out", str(tmp_path)]
    for extra, message in ((["--sources", "teacher"], "--sources"), (["--shard", "2", "--num-shards", "2"], "--shard"),
                           (["--rounds", "1", "--num-shards", "2"], "only with --rounds 0")):
        with pytest.raises(SystemExit):
            S.main(base + extra)
        assert message in capsys.readouterr().err
    twice = tmp_path / "twice.jsonl"
    twice.write_text('{"id": 1, "question": "q", "options": {"A": "a"}, "answer": "A"}\n' * 2, encoding="utf-8")
    with pytest.raises(T.UserError, match="not unique"):
        S.main(["--model", str(model_dir), "--data", str(twice), "--out", str(tmp_path)])


def test_shards_merge_to_the_unsharded_pairs(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    questions, student, corrections = script(rows)
    questions = [q for q in questions if q is not questions[3]]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), "utf-8")
    monkeypatch.setattr(S, "sample_texts", Scripted(tokenizer, questions, student, corrections))
    args = ["--model", str(model_dir), "--data", str(data), "--samples", "3", "--corrections", "2",
            "--max-new-tokens", "16", "--critique-max-new-tokens", "16", "--chunk-size", "1"]
    S.main(args + ["--out", str(tmp_path / "one")])
    S.main(args + ["--out", str(tmp_path / "two"), "--shard", "0", "--num-shards", "2"])
    with pytest.raises(T.UserError, match="shard 1 of 2 has not finished"):
        S.main(args + ["--out", str(tmp_path / "two"), "--num-shards", "2", "--merge"])
    S.main(args + ["--out", str(tmp_path / "two"), "--shard", "1", "--num-shards", "2"])
    S.main(args + ["--out", str(tmp_path / "two"), "--num-shards", "2", "--merge"])
    one, two = tmp_path / "one" / "round_1", tmp_path / "two" / "round_1"
    key = lambda p: (p["id"], p["sample"], p["correction"])  # noqa: E731
    assert sorted(read_jsonl(two / "pairs.jsonl"), key=key) == sorted(read_jsonl(one / "pairs.jsonl"), key=key)
    assert len(read_jsonl(two / "pairs.jsonl")) == 2
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())
    assert (two / "samples.jsonl").read_text("utf-8") == (one / "samples.jsonl").read_text("utf-8")


def test_rounds_driver_chains_models_and_resumes_by_round(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    """--rounds 2 with a stand-in for dpo.py: each round samples with the previous round's checkpoint, DPO flags
    are forwarded, and a run killed in round 2's DPO resumes there (under torchrun with 2 processes)."""
    questions, student, corrections = script(rows)
    sampler = Scripted(tokenizer, questions, student, corrections)
    monkeypatch.setattr(S, "sample_texts", sampler)
    log, fail = tmp_path / "dpo_calls.jsonl", tmp_path / "fail_round_2"
    monkeypatch.setenv("FAKE_DPO_LOG", str(log))
    monkeypatch.setenv("FAKE_DPO_FAIL", str(fail))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fail.touch()
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions[:3]), "utf-8")
    out = tmp_path / "run"
    args = ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--rounds", "2", "--samples", "3",
            "--corrections", "2", "--max-new-tokens", "16", "--critique-max-new-tokens", "16",
            "--dpo-script", str(FAKE_DPO), "--dpo-args", "--beta 0.5 --rpo-alpha 1"]
    with pytest.raises(T.UserError, match="DPO failed"):
        S.main(args)
    sampled = len(sampler.prompts)
    S.main(args + ["--nproc", "2"])
    assert len(sampler.prompts) == sampled  # round 2's pairs were complete: only its DPO ran again
    S.main(args)
    calls = read_jsonl(log)
    # round 1, round 2 (died), round 2 again on two ranks; the third run found both rounds done and called nothing
    assert [c["world_size"] for c in calls] == [None, None, "2", "2"]
    round_1_model = out / "round_1" / "dpo" / "step-000003"
    assert [(Path(c["model"]), Path(c["data"]), Path(c["out"])) for c in calls] == [
        (model_dir, out / "round_1" / "pairs.jsonl", out / "round_1" / "dpo")] + [
        (round_1_model, out / "round_2" / "pairs.jsonl", out / "round_2" / "dpo")] * 3
    assert all(c["extra"] == ["--beta", "0.5", "--rpo-alpha", "1"] and c["resume"]
               and Path(c["tokenizer"]) == model_dir for c in calls)
    for k, model in ((1, model_dir), (2, round_1_model)):
        summary = json.loads((out / f"round_{k}" / "summary.json").read_text())
        assert (summary["round"], Path(summary["model"]), summary["pairs"]) == (k, model, 2)
        assert {p["round"] for p in read_jsonl(out / f"round_{k}" / "pairs.jsonl")} == {k}
    assert Path(json.loads((out / "round_2" / "done.json").read_text())["checkpoint"]) == \
        out / "round_2" / "dpo" / "step-000003"


def test_one_real_round_with_dpo(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    """The driver with the real dpo.py: the round's pairs train the tiny model and its checkpoint is recorded."""
    if not (ROOT / "dpo.py").is_file():
        pytest.skip("dpo.py not present")
    questions, student, corrections = script(rows)
    monkeypatch.setattr(S, "sample_texts", Scripted(tokenizer, questions, student, corrections))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions[:2]), "utf-8")
    S.main(["--model", str(model_dir), "--data", str(data), "--out", str(tmp_path), "--rounds", "1",
            "--samples", "3", "--corrections", "2", "--max-new-tokens", "16", "--critique-max-new-tokens", "16",
            "--dpo-args", "--steps 2 --batch-size 2 --lr 1e-3 --warmup 0"])
    checkpoint = Path(json.loads((tmp_path / "round_1" / "done.json").read_text())["checkpoint"])
    assert checkpoint == tmp_path / "round_1" / "dpo" / "step-000002"
    before, after = M.load(model_dir).state_dict(), M.load(checkpoint).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)


# ----------------------------------------------------------------------------------------------------------------
# Real scale: sampling processes, an inference server, the config race.


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def real_args(model_dir, data, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--limit", "6", "--samples", "2", "--corrections", "1",
            "--max-new-tokens", "12", "--critique-max-new-tokens", "12", "--chunk-size", "2", *extra]


def test_sampling_processes_draw_what_one_process_draws(tmp_path, model_dir, monkeypatch):
    """--nproc 2: two sampling processes (one shard each), merged; the same samples, texts and pairs as one
    process, because each chunk's seed is its place in the whole question list."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    args = real_args(model_dir, SAMPLE_CSV, "--temperature", "1.0", "--top-p", "0.95")
    S.main(args + ["--out", str(tmp_path / "one")])
    S.main(args + ["--out", str(tmp_path / "two"), "--nproc", "2"])
    one, two = tmp_path / "one" / "round_1", tmp_path / "two" / "round_1"
    assert (two / "samples.shard1of2.jsonl").is_file()  # the second process really sampled
    records = read_jsonl(one / "samples.jsonl")
    assert len(records) == 6 and len({s["text"] for r in records for s in r["samples"]}) == 12  # varied samples
    assert read_jsonl(two / "samples.jsonl") == records
    assert read_jsonl(two / "pairs.jsonl") == read_jsonl(one / "pairs.jsonl")


def test_shards_started_together_never_see_a_half_written_config(tmp_path):
    """8 processes released by one barrier all call check_config on a fresh folder, 30 times."""
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    cfg = S.SelfPlayConfig()
    for trial in range(30):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        barrier = ctx.Barrier(8)

        def shard():
            barrier.wait()
            S.check_config(folder, cfg)
        procs = [ctx.Process(target=shard) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert [p.exitcode for p in procs] == [0] * 8, trial
        assert sorted(f.name for f in folder.iterdir()) == ["config.json"]


@pytest.fixture()
def server(model_dir):
    """tests/completion_server.py serving the tiny checkpoint on 127.0.0.1, as vLLM would serve it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "completion_server.py"), "--model", str(model_dir),
                             "--port", str(port), "--served-model-name", "tiny"],
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    try:
        S.wait_for_server(f"http://127.0.0.1:{port}", proc, 120)
        yield T.Server(f"http://127.0.0.1:{port}", "tiny", M.ModelConfig(max_position_embeddings=CONTEXT),
                       concurrency=4)
    finally:
        proc.terminate()
        proc.wait()


def test_server_greedy_samples_equal_the_built_in_sampler(tokenizer, model_dir, rows, server):
    """The same prompts through /v1/completions and through model.generate, greedy: the same replies, token for
    token (the server's text is what our own ids decode to), the same finished flags, n samples per prompt."""
    model = M.load(model_dir)
    prompts = [S.prompt_ids(tokenizer, T.student_messages(row)) for row in rows[:5]]
    cfg = S.SelfPlayConfig(temperature=0.0, batch_size=2)
    ids = T.special_ids(tokenizer)
    stop = (ids["im_end"], ids["endoftext"])
    built_in = S.sample_texts(model, tokenizer, prompts, 2, 20, cfg, seed=0)
    served = S.sample_texts(server, tokenizer, prompts, 2, 20, cfg, seed=0)
    assert [[(t, f) for t, f, _ in s] for s in served] == [[(t, f) for t, f, _ in s] for s in built_in]
    for prompt, samples in zip(prompts, served):
        [new] = M.generate(model, [prompt], 20, stop_ids=stop)
        finished = new[-1] in stop
        assert samples[0][:2] == (tokenizer.decode(new[:-1] if finished else new, skip_special_tokens=False),
                                  finished)
    assert any(f for s in served for _, f, _ in s) or all(len(t) for s in served for t, _, _ in s)


def test_serve_starts_a_server_per_round_samples_from_it_and_stops_it(tmp_path, model_dir):
    """--serve with a command template: the server is started for --model, sampled from (the same records as the
    built-in sampler, greedy) and stopped when the round's sampling is done."""
    port = free_port()
    serve = f"{sys.executable} {ROOT / 'tests' / 'completion_server.py'} --model {{model}} --port {{port}}"
    args = real_args(model_dir, SAMPLE_CSV, "--temperature", "0")
    S.main(args + ["--out", str(tmp_path / "served"), "--serve", serve, "--serve-port", str(port)])
    S.main(args + ["--out", str(tmp_path / "ours")])
    strip = lambda r: {**r, "samples": [{k: v for k, v in s.items() if k != "tokens"} for s in r["samples"]]}  # noqa
    served = [strip(r) for r in read_jsonl(tmp_path / "served" / "round_1" / "samples.jsonl")]
    assert served == [strip(r) for r in read_jsonl(tmp_path / "ours" / "round_1" / "samples.jsonl")]
    assert len(served) == 6
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    with pytest.raises(SystemExit, match="exited with code 3"):
        S.main(args + ["--out", str(tmp_path / "dead"), "--serve", f"{sys.executable} -c 'import sys; sys.exit(3)'"])


# --correction step: prefix kept byte for byte, the excluded step never re-emitted, the pair rule.

STEP_WRONG = "<think>\n审题：单选。\n回忆：甲有热。\n分析：A 对\n</think>\n依据如上。\n答案：A"  # q0's gold is C


def step_sampler(tokenizer, rows, critiques, rewrites, calls):
    """Scripted sample_texts for the step mode: students answer STEP_WRONG, critiques are scripted per call, and a
    rewrite returns rewrites[c] (everything from the rewritten line on, as the real sampler decodes it with its
    head); records each call's prompts and heads."""
    def sample(model, tok, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
        texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        calls.append((texts, heads))
        if heads is not None:
            return [[(rewrites[n % len(rewrites)], True, 7)] for n in range(len(prompts))]
        if texts and "首错行" in texts[0]:
            return [[(c, True, 4) for c in critiques] for _ in prompts]
        return [[(STEP_WRONG, True, 9)] * num_samples for _ in prompts]
    return sample


def test_step_pair_rule():
    ok = dict(finished=True, reemitted=False, predicted="C", well_formed=True, verified=True)
    assert S.step_pair_ok(ok, "C")
    for key, bad in (("finished", False), ("reemitted", True), ("predicted", "A"), ("well_formed", False),
                     ("verified", False)):
        assert not S.step_pair_ok({**ok, key: bad}, "C"), key


def test_step_corrections_keep_the_prefix_and_make_exactly_the_specified_pairs(tmp_path, rows, tokenizer, model_dir,
                                                                                monkeypatch):
    q0 = rows[0]
    checker = tmp_path / "check.py"
    checker.write_text("def no_x(text):\n    return 'X' not in text\n")
    # critiques: line 3 (the wrong one), no line named, line 1 (<think>: not a step), line 3 again, line 3 again
    critiques = ["2 无误\n3 有误\n首错行：3", "都对", "首错行：1", "首错行：3", "首错行：3"]
    rewrites = ["回忆：甲有咳。\n分析：C 对\n</think>\n依据如上。\n答案：C",  # right: the pair
                None, None,
                "回忆：甲有热。\n分析：A 对\n</think>\n依据如上。\n答案：C",  # rebuilds the excluded line
                "回忆：X。\n分析：C 对\n</think>\n依据如上。\n答案：C"]  # right but fails --verify
    rewrites = [r for r in rewrites if r]
    calls = []
    monkeypatch.setattr(S, "sample_texts", step_sampler(tokenizer, [q0], critiques, rewrites, calls))
    cfg = S.SelfPlayConfig(samples=1, corrections=5, max_new_tokens=64, critique_max_new_tokens=32,
                           correction="step", verify=f"{checker}:no_x")
    summary = S.run_round(model_dir, tokenizer, [q0], tmp_path / "run", cfg)
    [student], [critique_prompt], _ = calls[0][0], calls[1][0], calls[2]
    assert "首错行" in critique_prompt and "3| 回忆：甲有热。" in critique_prompt and "4| 分析：A 对" in critique_prompt
    rewrite_prompts, heads = calls[2]
    assert len(rewrite_prompts) == 3  # the three critiques that named a step line
    prefix = "<think>\n审题：单选。\n"
    for prompt, head in zip(rewrite_prompts, heads):
        # the continuation is the student's own reply: the student prompt, then the kept lines byte for byte
        assert prompt.startswith(student) and prompt[len(student):].startswith(prefix)
        assert prompt.endswith(tokenizer.decode(head, skip_special_tokens=False))
    [record] = read_jsonl(tmp_path / "run" / "samples.jsonl")
    entries = record["samples"][0]["corrections"]
    assert [e["line"] for e in entries] == [3, None, None, 3, 3]
    assert [e["marked"] for e in entries] == [True, False, False, True, True]
    assert [e["reemitted"] for e in entries] == [False, False, False, True, False]
    assert [e["right"] for e in entries] == [True, False, False, True, True]
    assert [e["verified"] for e in entries] == [True, False, False, True, False]
    for e in (entries[0], entries[3], entries[4]):
        assert e["text"].startswith(prefix) and e["text"].split("\n")[:2] == STEP_WRONG.split("\n")[:2]
    [pair] = read_jsonl(tmp_path / "run" / "pairs.jsonl")
    assert pair["chosen"][0]["content"] == prefix + rewrites[0] and pair["rejected"][0]["content"] == STEP_WRONG
    assert (pair["source"], pair["line"], pair["correction"], pair["locate"]) == ("step", 3, 0, "critique")
    assert summary["pairs"] == 1 and summary["corrections_reemitted"] == 1 and summary["corrections_unmarked"] == 2
    assert summary["teacher_calls"] == 0


def test_step_rewrite_never_re_emits_the_excluded_line(tmp_path, rows, tokenizer, model_dir, monkeypatch):
    """The real sampler, greedy, with a tiny model that has memorized a wrong sample (so continuing its kept lines
    greedily re-emits its line 3): the step correction keeps lines 1-2 byte for byte and changes line 3."""
    q0, stop = rows[0], (T.special_ids(tokenizer)["im_end"], T.special_ids(tokenizer)["endoftext"])
    prompt = S.prompt_ids(tokenizer, T.student_messages(q0))
    prefix = "<think>\n审题：单选。\n"
    wrong = prefix + "回忆：胆总管结石见黄疸。\n</think>\n答案：A"
    ids = prompt + tokenizer.encode(wrong, add_special_tokens=False).ids + [stop[0]]
    model = M.load(model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.tensor([ids])
    for _ in range(300):  # memorize the one reply
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1])[0, len(prompt) - 1:], x[0, len(prompt):])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    M.save(model, tmp_path / "memorized")
    tokenizer.save(str(tmp_path / "memorized" / "tokenizer.json"))
    model_dir = tmp_path / "memorized"
    head_ids = tokenizer.encode(prefix, add_special_tokens=False).ids
    line_ids = tokenizer.encode(wrong.split("\n</think>")[0], add_special_tokens=False).ids[len(head_ids):]
    [greedy] = M.generate(model, [prompt + head_ids], len(line_ids) + 4, stop_ids=stop)
    assert greedy[:len(line_ids)] == line_ids  # the premise: without the exclusion, line 3 comes back
    calls, real = [], S.sample_texts

    def sampler(m, tok, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
        text = tokenizer.decode(prompts[0], skip_special_tokens=False) if prompts else ""
        if heads is None and "首错行" in text:
            return [[("首错行：3", True, 3)] * num_samples for _ in prompts]
        if heads is None:
            return [[(wrong, True, 9)] * num_samples for _ in prompts]
        calls.append(heads)
        return real(m, tok, prompts, num_samples, 10, cfg, seed, heads=heads)
    monkeypatch.setattr(S, "sample_texts", sampler)
    for locate in ("critique", "confidence"):
        cfg = S.SelfPlayConfig(samples=1, corrections=2, max_new_tokens=64, critique_max_new_tokens=16,
                               temperature=0.0, correction="step", locate=locate)
        S.run_round(model_dir, tokenizer, [q0], tmp_path / locate, cfg)
        [record] = read_jsonl(tmp_path / locate / "samples.jsonl")
        for e in record["samples"][0]["corrections"]:
            k = e["line"] - 1
            assert e["text"].split("\n")[:k] == wrong.split("\n")[:k] and e["text"].startswith(
                "".join(x + "\n" for x in wrong.split("\n")[:k]))
            assert e["text"].split("\n")[k] != wrong.split("\n")[k] and not e["reemitted"]
        if locate == "critique":
            assert [e["line"] for e in record["samples"][0]["corrections"]] == [3, 3]
        else:  # the located line is the one holding the sample's least likely token, by an independent count
            with torch.no_grad():
                logits = model(torch.tensor([prompt + tokenizer.encode(wrong, add_special_tokens=False).ids]))[0]
            enc = tokenizer.encode(wrong, add_special_tokens=False)
            logps = torch.log_softmax(logits.double(), -1)[len(prompt) - 1:-1].gather(
                -1, torch.tensor(enc.ids)[:, None])[:, 0]
            lines = [wrong[:start].count("\n") for start, _ in enc.offsets]
            steps = {1, 2}  # 审题 and line 3: inside <think>, not the tags
            worst = min((lp, k) for lp, k in zip(logps.tolist(), lines) if k in steps)[1]
            assert record["samples"][0]["corrections"][0]["line"] == worst + 1


def test_step_mode_flags_are_checked(tmp_path, model_dir, capsys):
    base = ["--model", str(model_dir), "--data", str(SAMPLE_CSV), "--out", str(tmp_path)]
    for extra in (["--correction", "steps"], ["--locate", "guess"], ["--verify", "nofile.py"]):
        with pytest.raises(SystemExit):
            S.main(base + extra)
        assert extra[0] in capsys.readouterr().err
