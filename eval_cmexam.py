"""
eval_cmexam.py: CMExam evaluation of a Qwen2 checkpoint, with a per-category report a researcher can compare.

CMExam (Liu et al., NeurIPS 2023) is the Chinese national medical licensing exam: 5-option questions, about 3% with
several correct answers, and in the official test file five annotation columns (Disease Group, Area of Competency,
Clinical Department, Medical Discipline, Difficulty level). MedCritical (Su et al., arXiv 2509.23368) reports on its
test split. Three protocols, and every report says which one it used:

  cot     multiple choice, chain of thought (the standard protocol): the student prompt (templates.student_messages),
          greedy generation, templates.extract_answer; correct iff the predicted letter SET equals the gold set.
  direct  multiple choice without generation, a cheap deterministic baseline: one forward pass over a prompt that
          ends inside the assistant turn with "答案：" already written; the option letters are read off the
          next-token distribution (rule in choose_letters).
  judge   the authors' protocol: the question stem only (no options), a free answer, and an OpenAI-compatible judge
          (QwQ-32B for the authors) deciding right or wrong against the gold options' text (JUDGE_PROMPT).

    python eval_cmexam.py --model Qwen2.5-7B-Instruct --data test_with_annotations.csv --out runs/eval
    python eval_cmexam.py --model ckpt --data val.csv --out runs/eval --mode direct --sample 500 --seed 0
    python eval_cmexam.py --model ckpt --data test.csv --out runs/eval --mode judge \\
        --judge-base-url http://127.0.0.1:8000 --judge-model QwQ-32B

One process on one GPU (a 7B model in bf16 fits on one; no torchrun). Predictions are appended to
<out>/<mode>.predictions.jsonl as they are made, so a killed run started again with the same command resumes where it
stopped; the report (terminal table and <out>/<mode>.report.json) always covers every selected question.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from tqdm import tqdm

import templates as T
from model import ModelConfig, generate, load, load_tokenizer, next_token_logits

ANNOTATION_COLUMNS = ("Disease Group", "Area of Competency", "Clinical Department", "Medical Discipline",
                      "Difficulty level")
PROTOCOLS = {
    "cot": "multiple choice, chain of thought: student prompt, generation, extract_answer; exact match of the "
           "letter set with the gold letters",
    "direct": "multiple choice, direct: no generation; option letters scored from the next-token distribution "
              "after '答案：'; exact match of the letter set with the gold letters",
    "judge": "the authors' protocol: question stem only, free answer, an LLM judge compares it with the gold "
             "options' text",
}

# ----------------------------------------------------------------------------------------------------------------
# Prompts. cot uses the student prompt unchanged, so a trained student is evaluated exactly as it was trained.

DIRECT_INSTRUCTION = "请直接写出正确选项的字母（多选题按字母顺序连写），不要解释。"
DIRECT_ANSWER_START = "答案："  # written inside the assistant turn; the next token is the answer


def prompt_text(row, mode) -> str:
    if mode == "cot":
        return T.chat(T.student_messages(row))
    if mode == "direct":
        return T.chat([{"role": "user", "content": f"{T.format_question(row)}\n\n{DIRECT_INSTRUCTION}"}]) \
            + DIRECT_ANSWER_START
    return T.chat([{"role": "user", "content": row["question"]}])  # judge: the stem alone, as the authors do


JUDGE_PROMPT = """\
你是一位医学考试阅卷专家。下面是一道医学考试题的题干、标准答案和考生的回答。请判断考生回答的最终结论与标准答案是否一致：\
核心结论（如诊断、病因、药物、检查、机制、数值）与标准答案含义相同即为正确，不要求措辞相同；\
与标准答案不符、只答出标准答案的一部分（标准答案有多项时）、给出多个互相矛盾的结论或没有明确结论，均为错误。

【题干】
{question}

【标准答案】
{gold}

【考生回答】
{answer}

请简要说明理由，最后一行只写“判定：正确”或“判定：错误”。"""


def judge_messages(row, output):
    """The judge sees the stem, the gold options' text (no letters: the model never saw the options) and the
    model's final answer (the text after its last </think>, or all of it if it has none)."""
    answer = output.rsplit("</think>", 1)[-1].strip() or output.strip()
    gold = "；".join(row["options"][letter] for letter in row["answer"])
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=row["question"], gold=gold, answer=answer)}]


def parse_verdict(text):
    """True/False from the judge's last "判定：正确/错误" after its thinking; None if it gave none."""
    text = unicodedata.normalize("NFKC", text).rsplit("</think>", 1)[-1]
    verdicts = re.findall(r"判定\W*(正确|错误)", text)
    return None if not verdicts else verdicts[-1] == "正确"


# ----------------------------------------------------------------------------------------------------------------
# Direct mode: which token ids spell an answer right after "答案：", and the rule that turns their probabilities
# into a letter set. Qwen's BPE writes "答案：A" as [答案, ：, A] but "答案：AC" as [答案, ：, AC]: multi-letter tokens
# carry real probability mass, so they are candidates too (only the ones that are a single token).


def answer_token_ids(tokenizer) -> dict:
    """{letters: token id} for every sorted letter set over A-E that the tokenizer writes as ONE token after
    "<|im_start|>assistant\\n答案：" (checked by encoding, so a BPE merge across the colon would be caught)."""
    context = "<|im_start|>assistant\n" + DIRECT_ANSWER_START
    base = tokenizer.encode(context, add_special_tokens=False).ids
    found = {}
    for mask in range(1, 2 ** len(T.LETTERS)):
        letters = "".join(letter for i, letter in enumerate(T.LETTERS) if mask >> i & 1)
        ids = tokenizer.encode(context + letters, add_special_tokens=False).ids
        if len(ids) == len(base) + 1 and ids[:-1] == base:
            found[letters] = ids[-1]
    if not set(T.LETTERS) <= set(found):
        raise ValueError(f"direct mode needs each of A-E as its own token after {DIRECT_ANSWER_START!r}; "
                         f"this tokenizer has only {sorted(found)}")
    return found


def choose_letters(probs: dict, multiple: bool) -> str:
    """The direct-mode answer from {letters: probability} of the candidate tokens allowed by the row's options.

    Single-answer question: the single letter with the highest probability. Multiple-answer question (the prompt
    says which kind it is, so this uses nothing the model was not told): each letter's marginal, the probability of
    the candidates containing it over that of all candidates; the letters with marginal >= 0.5, and if fewer than
    two, the two with the highest marginals. The number of gold letters is never used."""
    if not multiple:
        return max((s for s in probs if len(s) == 1), key=lambda s: (probs[s], -ord(s)))
    total = sum(probs.values())
    marginal = {s: sum(p for t, p in probs.items() if s in t) / total for s in set("".join(probs))}
    chosen = [s for s in marginal if marginal[s] >= 0.5]
    if len(chosen) < 2:
        chosen = sorted(marginal, key=lambda s: (-marginal[s], s))[:2]
    return "".join(sorted(chosen))


# ----------------------------------------------------------------------------------------------------------------
# Predictions. One JSON record per question, written (and fsynced) the moment it exists: id, mode, prompt_hash,
# gold, output (raw text), extracted (letters), correct, skipped (None or a reason) and per-mode details.


def prompt_hash(text) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_predictions(path):
    T.done_ids(path)  # drops a last line cut off by a kill, so the file is whole JSONL again
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if path.exists() else []


def record(row, mode, prompt, **fields):
    rec = {"id": row["id"], "mode": mode, "prompt_hash": prompt_hash(prompt), "gold": row["answer"], "output": "",
           "extracted": "", "correct": None, "skipped": None}
    rec.update(fields)
    return rec


def predict_direct(model, tokenizer, batch, prompts, candidates):
    logits = next_token_logits(model, [prompts[row["id"]][1] for row in batch])  # left-padded, last position only
    probs = logits.float().softmax(-1).cpu()
    records = []
    for row, p in zip(batch, probs):
        allowed = {s: p[i].item() for s, i in candidates.items() if set(s) <= set(row["options"])}
        letters = choose_letters(allowed, multiple=len(row["answer"]) > 1)
        records.append(record(row, "direct", prompts[row["id"]][0], output=tokenizer.decode([int(p.argmax())]),
                              extracted=letters, correct=letters == row["answer"],
                              probs={s: float(f"{q:.6g}") for s, q in allowed.items()},
                              answer_mass=float(f"{sum(allowed.values()):.6g}")))
    return records


def predict_generate(model, tokenizer, batch, prompts, args):
    """cot and judge: one batched generate call, or with a T.Server one request per question carrying the exact
    prompt text (new_tokens is then the reply's re-encoded length); outputs keep special tokens except the final
    stop."""
    stop_ids = tuple(T.special_ids(tokenizer)[name] for name in ("im_end", "endoftext"))
    if isinstance(model, T.Server):
        try:
            replies = T.completions(model, [prompts[row["id"]][0] for row in batch], 1, args.max_new_tokens,
                                    args.temperature, args.top_p, stop_ids=stop_ids, seed=args.seed)
        except T.TeacherError as e:
            raise SystemExit(f"server {model.base_url} failed: {e}; rerun the same command to resume") from None
        outputs = [(text, finished, len(tokenizer.encode(text, add_special_tokens=False).ids) + finished)
                   for [(text, finished)] in replies]
    else:
        rows = generate(model, [prompts[row["id"]][1] for row in batch], args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, stop_ids=stop_ids, seed=args.seed)
        outputs = []
        for new in rows:
            finished = bool(new) and new[-1] in stop_ids
            outputs.append((tokenizer.decode(new[:-1] if finished else new, skip_special_tokens=False), finished,
                            len(new)))
    records = []
    for row, (text, finished, new_tokens) in zip(batch, outputs):
        rec = record(row, args.mode, prompts[row["id"]][0], output=text, new_tokens=new_tokens, finished=finished)
        if args.mode == "cot":
            rec["extracted"] = T.extract_answer(text)
            rec["correct"] = rec["extracted"] == row["answer"]
        records.append(rec)
    return records


def judge_one(cfg, row, rec):
    """Fills in the judge's verdict; a judge failure becomes a counted skip, never an exception."""
    try:
        reply = T.chat_completion(cfg, judge_messages(row, rec["output"]))
    except T.TeacherError as e:
        return {**rec, "skipped": f"judge_{e.kind}"}
    verdict = parse_verdict(reply)
    return {**rec, "judge_output": reply, "correct": verdict, "skipped": None if verdict is not None
            else "judge_unparseable"}


def run(model, tokenizer, rows, args, path, judge_cfg=None):
    """Predict every row not yet in `path`, longest prompt first (a memory problem shows in the first batch)."""
    done = {rec["id"]: rec for rec in read_predictions(path)}
    prompts = {}
    for row in rows:
        text = prompt_text(row, args.mode)
        prompts[row["id"]] = (text, tokenizer.encode(text, add_special_tokens=False).ids)
    changed = [i for i, rec in done.items() if i in prompts and rec["prompt_hash"] != prompt_hash(prompts[i][0])]
    if changed:
        raise SystemExit(f"{path}: {len(changed)} stored predictions (e.g. id {changed[0]}) were made from other "
                         f"prompts (data or templates changed); use another --out")
    pending = sorted((row for row in rows if row["id"] not in done), key=lambda r: -len(prompts[r["id"]][1]))
    context = model.config.max_position_embeddings
    budget = 0 if args.mode == "direct" else args.max_new_tokens
    candidates = answer_token_ids(tokenizer) if args.mode == "direct" else None
    pool = ThreadPoolExecutor(judge_cfg.concurrency) if judge_cfg else None
    judging = []
    bar = tqdm(total=len(pending), desc=args.mode, unit="question", dynamic_ncols=True)
    with open(path, "a", encoding="utf-8") as f:
        def write(records):
            for rec in records:
                T.append_jsonl(f, rec)
            bar.update(len(records))

        try:
            too_long = [r for r in pending if len(prompts[r["id"]][1]) + budget > context]
            write([record(r, args.mode, prompts[r["id"]][0], skipped="prompt_too_long",
                          skip_detail=f"{len(prompts[r['id']][1])} prompt tokens + {budget} new > context {context}")
                   for r in too_long])
            pending = [r for r in pending if len(prompts[r["id"]][1]) + budget <= context]
            for start in range(0, len(pending), args.batch_size):
                batch = pending[start:start + args.batch_size]
                if args.mode == "direct":
                    write(predict_direct(model, tokenizer, batch, prompts, candidates))
                    continue
                records = predict_generate(model, tokenizer, batch, prompts, args)
                if pool is None:
                    write(records)
                    continue
                # The judge works in threads while the GPU generates the next batch.
                judging += [pool.submit(judge_one, judge_cfg, row, rec) for row, rec in zip(batch, records)]
                finished = {fut for fut in judging if fut.done()}  # one snapshot: none dropped or written twice
                judging = [fut for fut in judging if fut not in finished]
                write([fut.result() for fut in finished])
            for fut in as_completed(judging):
                write([fut.result()])
        finally:
            bar.close()
            if pool:
                pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------------------------------
# Scoring: a pure function of predictions and rows, so it is tested on hand-made predictions.


def wilson(correct, n, z=1.959963984540054):
    """95% Wilson score interval for a binomial proportion (Wilson 1927; Newcombe 1998, method 3). Unlike the
    normal approximation it stays inside [0, 1] and is sound for small n and accuracies near 0 or 1."""
    if n == 0:
        return None
    p, z2 = correct / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, center - half), min(1.0, center + half)]


def _stats(outcomes):
    n, k = len(outcomes), sum(outcomes)
    return {"n": n, "correct": k, "accuracy": k / n if n else None, "ci95": wilson(k, n)}


def score(predictions, rows) -> dict:
    """Accuracy overall, by single/multiple answer and by each annotation column present, over the `rows` that
    have a scored prediction. Multiple-choice records are re-scored here as letter SETS ("CA" == "AC" != "A");
    judge records carry the judge's verdict. Skipped records (prompt too long, judge failure) are counted by reason
    and left out of the accuracies; rows with no prediction at all are counted as missing."""
    by_id = {}
    for rec in predictions:
        if rec["id"] in by_id:
            raise ValueError(f"duplicate predictions for id {rec['id']}")
        by_id[rec["id"]] = rec
    modes = {rec["mode"] for rec in predictions}
    if len(modes) > 1:
        raise ValueError(f"predictions mix protocols {sorted(modes)}")
    mode = modes.pop() if modes else None
    columns = [c for c in ANNOTATION_COLUMNS if any(c in row for row in rows)]
    overall, kinds, groups = [], defaultdict(list), {c: defaultdict(list) for c in columns}
    skipped, missing, no_answer, truncated = Counter(), 0, 0, 0
    for row in rows:
        rec = by_id.get(row["id"])
        if rec is None:
            missing += 1
            continue
        if rec.get("skipped"):
            skipped[rec["skipped"]] += 1
            continue
        if mode == "judge":
            correct = bool(rec["correct"])
        else:
            correct = "".join(sorted(set(rec["extracted"]))) == row["answer"]
            no_answer += not rec["extracted"]
        truncated += rec.get("finished") is False
        overall.append(correct)
        kinds["multiple" if len(row["answer"]) > 1 else "single"].append(correct)
        for c in columns:
            value = str(row.get(c) or "").strip()
            groups[c][value if value.lower() not in ("", "nan") else "(missing)"].append(correct)
    scored = len(overall)
    return {
        "protocol": mode, "protocol_description": PROTOCOLS.get(mode), "questions": len(rows), "scored": scored,
        "missing": missing, "skipped": dict(skipped), "overall": _stats(overall),
        "answer_type": {kind: _stats(kinds[kind]) for kind in ("single", "multiple")},
        "columns": {c: {v: _stats(o) for v, o in sorted(groups[c].items(), key=lambda kv: (-len(kv[1]), kv[0]))}
                    for c in columns},
        "no_answer": None if mode == "judge" else {"n": no_answer, "share": no_answer / scored if scored else None},
        "truncated": {"n": truncated, "share": truncated / scored if scored else None},
    }


def _cell(text, width):
    """Left-justify by display width: a CJK character takes two terminal columns."""
    text = str(text)
    shown = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(0, width - shown)


def format_report(report) -> str:
    def line(group, value, s):
        acc = "    -" if s["accuracy"] is None else f"{100 * s['accuracy']:5.1f}"
        ci = "" if s["ci95"] is None else f"[{100 * s['ci95'][0]:4.1f}, {100 * s['ci95'][1]:4.1f}]"
        return f"{_cell(group, 20)}{_cell(value, 26)}{s['n']:>6}{s['correct']:>8}  {acc}  {ci}"

    out = [f"CMExam, protocol {report['protocol']}: {report['protocol_description']}",
           f"{_cell('group', 20)}{_cell('value', 26)}{'n':>6}{'correct':>8}  acc %  95% CI (Wilson)",
           line("overall", "", report["overall"])]
    out += [line("answer type", kind, s) for kind, s in report["answer_type"].items()]
    for column, values in report["columns"].items():
        out += [line(column, value, s) for value, s in values.items()]
    notes = [f"{report['scored']} of {report['questions']} questions scored"]
    if report["no_answer"] is not None:
        notes.append(f"no extractable answer: {report['no_answer']['n']}")
    notes.append(f"hit --max-new-tokens: {report['truncated']['n']}")
    notes += [f"skipped {reason}: {n}" for reason, n in report["skipped"].items()]
    notes += [f"MISSING (no prediction): {report['missing']}"] if report["missing"] else []
    return "\n".join(out + ["; ".join(notes)])


# ----------------------------------------------------------------------------------------------------------------
# Command line


def select_rows(path, limit=None, sample=None, seed=0):
    rows = T.load_cmexam(path)
    if len({row["id"] for row in rows}) != len(rows):
        raise SystemExit(f"{path}: question ids are not unique, so predictions could not be matched or resumed")
    if sample is not None:
        picked = set(random.Random(seed).sample(range(len(rows)), min(sample, len(rows))))
        rows = [row for i, row in enumerate(rows) if i in picked]
    return rows[:limit]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face Qwen2 checkpoint folder")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json (default: --model)")
    parser.add_argument("--data", required=True, help="CMExam .csv/.json/.jsonl (official test_with_annotations.csv)")
    parser.add_argument("--out", required=True, help="folder for <mode>.predictions.jsonl, .report.json, .run.json")
    parser.add_argument("--mode", choices=PROTOCOLS, default="cot")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=int, help="only the first N questions of the file")
    pick.add_argument("--sample", type=int, help="a random N questions (seeded by --seed)")
    parser.add_argument("--seed", type=int, default=0, help="for --sample and for sampling at --temperature > 0")
    parser.add_argument("--batch-size", type=int, default=32, help="questions per generate call / forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=2048, help="long chains of thought need ~2k")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-url", help="cot/judge: generate with this OpenAI-compatible server (e.g. `vllm "
                        "serve MODEL --dtype bfloat16`; key, if any, from $OPENAI_API_KEY), not model.generate")
    parser.add_argument("--served-model", help="the model name the server serves (default: the first it lists)")
    parser.add_argument("--server-concurrency", type=int, default=64, help="requests in flight to --base-url")
    for field in dataclasses.fields(T.TeacherConfig):  # the judge endpoint, judge mode only
        parser.add_argument("--judge-" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                            help=f"judge mode: TeacherConfig.{field.name}")
    args = parser.parse_args(argv)
    if args.base_url and args.mode == "direct":
        parser.error("--base-url generates (cot, judge); direct mode reads next-token scores from the model itself")

    rows = select_rows(args.data, args.limit, args.sample, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    judge_cfg = T.TeacherConfig(**{f.name: getattr(args, "judge_" + f.name)
                                   for f in dataclasses.fields(T.TeacherConfig)})
    # Settings that change a prediction: a resumed run must use the same ones, or its file would mix two runs.
    settings = {"mode": args.mode, "model": str(Path(args.model).resolve()), "dtype": args.dtype}
    if args.mode != "direct":
        settings.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed if args.temperature > 0 else None)
    if args.mode == "judge":
        settings.update(judge_model=judge_cfg.model, judge_temperature=judge_cfg.temperature)
    if args.base_url:  # the server's own numerics (and dtype) make the predictions
        settings.update(server=args.base_url, dtype=None)
    run_file = out / f"{args.mode}.run.json"
    if run_file.exists() and json.loads(run_file.read_text()) != settings:
        raise SystemExit(f"{run_file} holds other settings: {run_file.read_text()}; use another --out to compare")
    run_file.write_text(json.dumps(settings, indent=2) + "\n")

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.base_url:
        config = ModelConfig.from_hf(json.loads((Path(args.model) / "config.json").read_text()))
        try:
            name = args.served_model or T.served_models(args.base_url)[0]
        except (T.TeacherError, IndexError) as e:
            raise SystemExit(f"{args.base_url}/v1/models did not list a model ({e!r}); is the server up?") from None
        model = T.Server(args.base_url, name, config, args.server_concurrency)
    else:
        model = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} ids, model only {model.config.vocab_size}")
    path = out / f"{args.mode}.predictions.jsonl"
    run(model, tokenizer, rows, args, path, judge_cfg if args.mode == "judge" else None)

    report = {**score(read_predictions(path), rows), "settings": {**settings, "data": args.data}}
    (out / f"{args.mode}.report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
