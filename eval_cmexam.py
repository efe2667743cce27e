"""
eval_cmexam.py: CMExam evaluation of a Qwen2 checkpoint, with a per-category report a researcher can compare.

CMExam (Liu et al., NeurIPS 2023): 5-option questions of the Chinese medical licensing exam, ~3% with several right
answers; its test file adds five annotation columns. Three protocols (README: "Evaluation on CMExam"), and every
report names the one it used:

  cot     the student prompt, greedy, templates.extract_answer; right iff the letter SET equals the gold set and the
          reply finished (one cut off at --max-new-tokens scores wrong, counted).
  direct  no generation: the letters are read off the next-token distribution after "答案：" (choose_letters).
  judge   the stem alone, a free answer, an OpenAI-compatible judge against the gold options' text. --judge-protocol
          authors is the authors' scripts exactly (github destinybird/SP-Huatuo, ForTest.py and ForJudge.py);
          rubric is our stricter variant (JUDGE_PROMPT), with no published peer.

    python eval_cmexam.py --model Qwen2.5-7B-Instruct --data test_with_annotations.csv --out runs/eval
    python eval_cmexam.py --model ckpt --data val.csv --out runs/eval --mode direct --sample 500 --sample-seed 0
    python eval_cmexam.py --model ckpt --data test.csv --out runs/eval --mode judge \\
        --judge-base-url http://127.0.0.1:8000 --judge-model QwQ-32B
    python eval_cmexam.py --compare runs/eval_a runs/eval_b      # paired: which questions flipped, McNemar

One process on one GPU. <out>/<mode>.predictions.jsonl is appended as predictions are made, so the same command
resumes a killed run (and re-judges every stored reply whose judge call failed); the report (terminal table and
<out>/<mode>.report.json) covers every selected question.
"""
import dataclasses
import hashlib
import json
import math
import random
import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from model import ModelConfig, generate, load, load_tokenizer, next_token_logits
from templates import (LETTERS, ArgumentParser, Server, TeacherConfig, TeacherError, TeacherRun, UserError,
                       append_jsonl, chat, chat_completion, check_settings, check_unique_ids, completions,
                       daemon_pool, extract_answer, format_question, load_cmexam, lock_output, nonnegative_float,
                       positive_int, probability, read_jsonl, reply_text, run_main, served_models, stop_ids,
                       student_messages, teacher_arg_type, write_jsonl)

ANNOTATION_COLUMNS = ("Disease Group", "Area of Competency", "Clinical Department", "Medical Discipline",
                      "Difficulty level")
PROTOCOLS = {
    "cot": "multiple choice, chain of thought: student prompt, generation, extract_answer; exact match of the "
           "letter set with the gold letters",
    "direct": "multiple choice, direct: no generation; option letters scored from the next-token distribution "
              "after '答案：'; exact match of the letter set with the gold letters",
    "judge": "question stem only, free answer, an LLM judge compares it with the gold options' text",
}
JUDGE_PROTOCOLS = {
    "authors": "the authors' scripts exactly: raw prompt, temperature 0.7 / top_p 0.9, 450 new tokens, the whole "
               "reply judged with their prompt, one-token verdict 1 (right) / 2 (wrong)",
    "rubric": "ours: chat template, greedy, the answer after </think> judged with a stricter rubric (JUDGE_PROMPT)",
}
# The student's sampling per protocol. cot's cap is the longest reply our Stage 1 data holds (distill's teacher
# writes up to TeacherConfig.max_tokens = 8192; sft.py trains up to 8192 tokens), so a trained student is never cut
# off mid-answer; a reply that still hits it is looping, and scores wrong. At batch 32 a 7B model's KV cache for
# (625 + 8192) tokens is ~16 GB in bf16.
COT_SAMPLING = {"max_new_tokens": TeacherConfig.max_tokens, "temperature": 0.0, "top_p": 1.0}
STUDENT_SAMPLING = {"cot": COT_SAMPLING, "rubric": COT_SAMPLING,
                    "authors": {"max_new_tokens": 450, "temperature": 0.7, "top_p": 0.9}}
# The judge's sampling: the authors' ForJudge.py asks vLLM for max_tokens 1, temperature 0.01, top_k 2 and
# allowed_token_ids = the ids of "1" and "2" (16 and 17 in Qwen2.5's and QwQ's vocabulary); top_p is vLLM's 1.0.
JUDGE_SAMPLING = {"authors": {"temperature": 0.01, "top_p": 1.0, "max_tokens": 1},
                  "rubric": {"temperature": 0.5, "top_p": 0.9, "max_tokens": 8192}}
AUTHORS_VERDICT_IDS = (16, 17)

# ----------------------------------------------------------------------------------------------------------------
# Prompts. cot uses the student prompt unchanged, so a trained student is evaluated exactly as it was trained.

DIRECT_INSTRUCTION = "请直接写出正确选项的字母（多选题按字母顺序连写），不要解释。"
DIRECT_ANSWER_START = "答案："  # written inside the assistant turn; the next token is the answer

# The authors' prompts, character for character (ForTest.py, ForJudge.py). ForTest.py hands the student prompt to
# vLLM's LLM.generate as a plain string: no chat template. ForJudge.py wraps its prompt in the judge's chat template
# with the system message below, and sends the reply cut after "只解释这一个问题即可" if the model echoed the prompt.
AUTHORS_STUDENT_PROMPT = ("你是一位医学专家，请先深呼吸，然后用中文一步一步地思考并回答这个问题，给出分点罗列的解释："
                          "问题：{question}？只解释这一个问题即可")
AUTHORS_JUDGE_SYSTEM = "You are a helpful assistant."
AUTHORS_JUDGE_PROMPT = ("这是一位小模型对问题的回复内容，根据其内容判断其是否做到了正确回复。问题：{question}？"
                        "答案是：{answer}，小模型回复：{response}。如果正确，则只直接回复1。如果错误，则只直接回复2")

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


def prompt_text(row, mode, judge_protocol="authors") -> str:
    if mode == "cot":
        return chat(student_messages(row))
    if mode == "direct":
        return chat([{"role": "user", "content": f"{format_question(row)}\n\n{DIRECT_INSTRUCTION}"}]) \
            + DIRECT_ANSWER_START
    if judge_protocol == "authors":
        return AUTHORS_STUDENT_PROMPT.format(question=row["question"])
    return chat([{"role": "user", "content": row["question"]}])  # rubric: the stem alone, as a user turn


def judge_messages(row, output, protocol="authors"):
    """The judge sees the stem, the gold options' text (no letters: the model never saw the options) and the reply:
    all of it (authors) or the final answer after its last </think> (rubric)."""
    gold = "；".join(row["options"][letter] for letter in row["answer"])
    if protocol == "authors":
        response = output.strip()
        if "只解释这一个问题即可" in response:
            response = response.split("只解释这一个问题即可")[-1].strip()
        return [{"role": "system", "content": AUTHORS_JUDGE_SYSTEM}, {"role": "user", "content": (
            AUTHORS_JUDGE_PROMPT.format(question=row["question"], answer=gold, response=response))}]
    answer = output.rsplit("</think>", 1)[-1].strip() or output.strip()
    return [{"role": "user", "content": JUDGE_PROMPT.format(question=row["question"], gold=gold, answer=answer)}]


def parse_verdict(text):
    """True/False from the judge's last "判定：正确/错误" after its thinking; None if it gave none."""
    verdicts = re.findall(r"判定\W*(正确|错误)", unicodedata.normalize("NFKC", text).rsplit("</think>", 1)[-1])
    return None if not verdicts else verdicts[-1] == "正确"


def parse_token_verdict(text):
    """The authors' one-token verdict, strictly: "1" right, "2" wrong, anything else None (a counted judge failure:
    a server that ignored allowed_token_ids). A reasoning parser may file the token as thinking, which the client
    returns inside <think> tags; they are not part of the verdict."""
    return {"1": True, "2": False}.get(re.sub(r"</?think>", "", text).strip())


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
    for mask in range(1, 2 ** len(LETTERS)):
        letters = "".join(letter for i, letter in enumerate(LETTERS) if mask >> i & 1)
        ids = tokenizer.encode(context + letters, add_special_tokens=False).ids
        if len(ids) == len(base) + 1 and ids[:-1] == base:
            found[letters] = ids[-1]
    if not set(LETTERS) <= set(found):
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

class Prompt(NamedTuple):
    text: str
    ids: list


class Judge(NamedTuple):
    cfg: TeacherConfig
    protocol: str  # "authors" or "rubric"
    extra: dict  # extra request fields (the authors' top_k and allowed_token_ids)


def prompt_hash(text) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(row, mode, prompt, **fields):
    return {"id": row["id"], "mode": mode, "prompt_hash": prompt_hash(prompt.text), "gold": row["answer"],
            "output": "", "extracted": "", "correct": None, "skipped": None, **fields}


def predict_direct(model, tokenizer, batch, prompts, candidates):
    logits = next_token_logits(model, [prompts[row["id"]].ids for row in batch])  # left-padded, last position only
    if not torch.isfinite(logits).all():
        raise SystemExit(f"non-finite logits for the batch starting at question {batch[0]['id']}: refusing to score "
                         f"(a broken checkpoint, or an overflow in {logits.dtype})")
    records = []
    for row, p in zip(batch, logits.float().softmax(-1).cpu()):
        allowed = {s: p[i].item() for s, i in candidates.items() if set(s) <= set(row["options"])}
        letters = choose_letters(allowed, multiple=len(row["answer"]) > 1)
        records.append(record(row, "direct", prompts[row["id"]], output=tokenizer.decode([int(p.argmax())]),
                              extracted=letters, correct=letters == row["answer"],
                              probs={s: float(f"{q:.6g}") for s, q in allowed.items()},
                              answer_mass=float(f"{sum(allowed.values()):.6g}")))
    return records


def predict_generate(model, tokenizer, batch, prompts, args):
    """cot and judge: one batched generate call, or with a Server one request per question carrying the exact
    prompt text (new_tokens is then the reply's re-encoded length); outputs keep special tokens except the final
    stop."""
    stop = stop_ids(tokenizer)
    # The seed comes from the batch's first question, so batches draw different noise and a resumed run the same.
    seed = zlib.crc32(repr((args.seed, batch[0]["id"])).encode())
    if isinstance(model, Server):
        try:
            replies = completions(model, [prompts[row["id"]].text for row in batch], 1, args.max_new_tokens,
                                  args.temperature, args.top_p, stop_ids=stop, seed=seed)
        except TeacherError as e:
            raise UserError(f"server {model.base_url} failed: {e}; rerun the same command to resume") from None
        outputs = [(text, finished, len(tokenizer.encode(text, add_special_tokens=False).ids) + finished)
                   for [(text, finished)] in replies]
    else:
        new = generate(model, [prompts[row["id"]].ids for row in batch], args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, stop_ids=stop, seed=seed)
        outputs = [(*reply_text(tokenizer, ids), len(ids)) for ids in new]
    records = []
    for row, (text, finished, new_tokens) in zip(batch, outputs):
        rec = record(row, args.mode, prompts[row["id"]], output=text, new_tokens=new_tokens, finished=finished)
        if args.mode == "cot":
            rec["extracted"] = extract_answer(text)
            rec["correct"] = rec["extracted"] == row["answer"] and finished  # as credited() scores it
        records.append(rec)
    return records


def judge_one(judge, row, rec, run=None):
    """Fills in the judge's verdict; a judge failure becomes a counted skip. Only a TeacherFatal (the run must stop:
    refused key, unreachable judge) is raised."""
    rec = {**rec, "judge_protocol": judge.protocol}
    try:
        reply = chat_completion(judge.cfg, judge_messages(row, rec["output"], judge.protocol), run=run,
                                extra=judge.extra)
    except TeacherError as e:
        return {**rec, "correct": None, "skipped": f"judge_{e.kind}"}
    verdict = (parse_token_verdict if judge.protocol == "authors" else parse_verdict)(reply)
    return {**rec, "judge_output": reply, "correct": verdict,
            "skipped": None if verdict is not None else "judge_unparseable"}


def judged(judge, rows_by_id, records):
    """judge_one over `records`, judge.cfg.concurrency calls at a time, yielded in order."""
    with ThreadPoolExecutor(judge.cfg.concurrency) as pool:
        yield from pool.map(lambda rec: judge_one(judge, rows_by_id[rec["id"]], rec), records)


def rejudge(judge, rows_by_id, path):
    """Judge again, from the stored replies, every record of `path` whose judge call failed (nothing is generated
    again), then replace the file atomically. Returns how many were re-judged."""
    records = read_jsonl(path)
    failed = [i for i, rec in enumerate(records)
              if str(rec.get("skipped") or "").startswith("judge_") and rec["id"] in rows_by_id]
    for i, rec in zip(failed, judged(judge, rows_by_id, [records[i] for i in failed])):
        records[i] = rec
    if failed:
        write_jsonl(path, records)
    return len(failed)


def judge_while_generating(judge, rows_by_id, batches, write):
    """Judge each generated batch in threads while the GPU generates the next; write each record once judged.
    Daemon threads and one TeacherRun: Ctrl-C or a fatal judge error (refused key, dead server) stops every request,
    and the verdicts already in are written first."""
    submit, judge_run, pending = daemon_pool(judge.cfg.concurrency), TeacherRun(), []
    try:
        for records in batches:
            pending += [submit(judge_one, judge, rows_by_id[rec["id"]], rec, judge_run) for rec in records]
            done = {fut for fut in pending if fut.done()}  # one snapshot: none dropped or written twice
            pending = [fut for fut in pending if fut not in done]
            write([fut.result() for fut in done])
        wait(pending)
        records = [fut.result() for fut in pending]  # a TeacherFatal is raised before anything is written
        pending = []
        write(records)
    except BaseException:
        judge_run.stop.set()
        write([fut.result() for fut in pending if fut.done() and not fut.exception()])
        raise
    finally:
        for fut in pending:
            fut.cancel()
        submit(None)


def run(model, tokenizer, rows, args, path, judge=None):
    """Predict every row not yet in `path`, longest prompt first (a memory problem shows in the first batch)."""
    prompts = {}
    for row in rows:
        text = prompt_text(row, args.mode, args.judge_protocol)
        prompts[row["id"]] = Prompt(text, tokenizer.encode(text, add_special_tokens=False).ids)
    done = {rec["id"]: rec for rec in read_jsonl(path)}
    changed = [i for i, rec in done.items() if i in prompts and rec["prompt_hash"] != prompt_hash(prompts[i].text)]
    if changed:
        raise UserError(f"{path}: {len(changed)} stored predictions (e.g. id {changed[0]}) were made from other "
                        f"prompts (data or templates changed); use another --out")
    context, budget = model.config.max_position_embeddings, 0 if args.mode == "direct" else args.max_new_tokens
    todo = sorted((row for row in rows if row["id"] not in done), key=lambda row: -len(prompts[row["id"]].ids))
    too_long = [row for row in todo if len(prompts[row["id"]].ids) + budget > context]
    todo = [row for row in todo if len(prompts[row["id"]].ids) + budget <= context]
    predict = partial(predict_direct, candidates=answer_token_ids(tokenizer)) if args.mode == "direct" \
        else partial(predict_generate, args=args)
    batches = (predict(model, tokenizer, todo[i:i + args.batch_size], prompts)
               for i in range(0, len(todo), args.batch_size))
    with open(path, "a", encoding="utf-8") as f, \
            tqdm(total=len(too_long) + len(todo), desc=args.mode, unit="question", dynamic_ncols=True) as bar:
        def write(records):
            for rec in records:
                append_jsonl(f, rec)
            bar.update(len(records))

        write([record(row, args.mode, prompts[row["id"]], skipped="prompt_too_long",
                      skip_detail=f"{len(prompts[row['id']].ids)} prompt tokens + {budget} new > context {context}")
               for row in too_long])
        if judge:
            judge_while_generating(judge, {row["id"]: row for row in rows}, batches, write)
        else:
            for records in batches:
                write(records)


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


# Which questions cannot be answered fairly without their options (the judge protocols hide them): stems that point
# at the options (822 of the val split's 6,810) and gold options whose text means nothing alone (88 there).
OPTION_STEM = re.compile(r"下列|以下|哪项|哪一项|哪个|选项")
OPTION_GOLD = re.compile(r"^(?:以上|上述)|^[A-E](?:[+、和与及][A-E])+|^(?:都|均|全|皆)(?:是|对|不是|不对|正确|错误|可以|有|无)$")


def needs_options(row):
    stem = bool(OPTION_STEM.search(row["question"]))
    gold = any(OPTION_GOLD.search(row["options"][letter]) for letter in row["answer"])
    return stem, gold


def credited(rec, gold=None):
    """Whether a scored (not skipped) record counts as right. Multiple choice: the letter SET equals the gold set
    ("CA" == "AC" != "A") and the reply was finished (a cot reply cut off at --max-new-tokens scores wrong).
    Judge: the verdict on whatever was written (the authors' 450-token cap is part of their protocol); the report's
    finished-only accuracy shows what truncation did."""
    if rec["mode"] == "judge":
        return bool(rec["correct"])
    return "".join(sorted(set(rec["extracted"]))) == (gold or rec["gold"]) and rec.get("finished") is not False


def protocol_of(predictions):
    """"cot", "direct", "judge/authors" or "judge/rubric"; an error if the records mix protocols."""
    names = {rec["mode"] + ("/" + rec.get("judge_protocol", "rubric") if rec["mode"] == "judge" else "")
             for rec in predictions}
    if len(names) > 1:
        raise ValueError(f"predictions mix protocols {sorted(names)}")
    return names.pop() if names else None


def score(predictions, rows, dropped=()) -> dict:
    """The report of `predictions` on `rows` (README: "Evaluation on CMExam"): accuracy over the questions with a
    scored prediction (`credited` says which are right), overall and by group; records skipped (prompt too long,
    judge failure) counted by reason and left out, rows without a prediction counted as missing, `dropped` the rows
    load_cmexam skipped ([(where, reason)]). Refuses duplicates, mixed protocols and non-finite direct-mode scores."""
    by_id = {}
    for rec in predictions:
        if rec["id"] in by_id:
            raise ValueError(f"duplicate predictions for id {rec['id']}")
        by_id[rec["id"]] = rec
    protocol = protocol_of(predictions)
    mode = protocol and protocol.split("/")[0]
    nonfinite = [rec["id"] for rec in predictions
                 if not all(math.isfinite(v) for v in [rec.get("answer_mass", 0), *rec.get("probs", {}).values()])]
    if nonfinite:
        raise ValueError(f"non-finite scores in {len(nonfinite)} predictions (e.g. id {nonfinite[0]}): the model "
                         "produced NaN/inf logits; refusing to score")
    present = [(row, by_id[row["id"]]) for row in rows if row["id"] in by_id]
    scored = [(row, rec) for row, rec in present if not rec.get("skipped")]
    right = [credited(rec, row["answer"]) for row, rec in scored]
    needs = [needs_options(row) for row, _ in scored]  # (stem, gold text)

    def where(keep):  # accuracy on the scored questions (row, rec) that keep() keeps
        return _stats([ok for (row, rec), ok in zip(scored, right) if keep(row, rec)])

    def by_value(column):  # accuracy per value of an annotation column, largest group first
        groups = defaultdict(list)
        for (row, _), ok in zip(scored, right):
            value = str(row.get(column) or "").strip()
            groups[value if value.lower() not in ("", "nan") else "(missing)"].append(ok)
        return {v: _stats(o) for v, o in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}

    n, truncated = len(scored), sum(rec.get("finished") is False for _, rec in scored)
    no_answer = sum(not rec["extracted"] for _, rec in scored)
    letters = {x: Counter({"gold": sum(x in row["answer"] for row, _ in scored),
                           "predicted": sum(x in rec["extracted"] for _, rec in scored)}) for x in LETTERS}
    masses = [rec["answer_mass"] for _, rec in scored if "answer_mass" in rec]
    return {
        "protocol": protocol, "protocol_description": PROTOCOLS.get(mode) if mode != "judge" else
        f"{PROTOCOLS['judge']}; {JUDGE_PROTOCOLS[protocol.split('/')[1]]}", "questions": len(rows),
        "scored": n, "missing": len(rows) - len(present),
        "skipped": dict(Counter(rec["skipped"] for _, rec in present if rec.get("skipped"))),
        "overall": _stats(right), "strict": _stats(right + [False] * (len(rows) - n)),
        "finished_only": where(lambda row, rec: rec.get("finished") is not False),
        "answer_type": {"single": where(lambda row, rec: len(row["answer"]) == 1),
                        "multiple": where(lambda row, rec: len(row["answer"]) > 1)},
        "columns": {c: by_value(c) for c in ANNOTATION_COLUMNS if any(c in row for row in rows)},
        "no_answer": None if mode == "judge" else {"n": no_answer, "share": no_answer / n if n else None},
        "truncated": {"n": truncated, "share": truncated / n if n else None},
        "dropped_at_load": {"n": len(dropped), "reasons": dict(Counter(reason for _, reason in dropped))},
        "letters": None if mode == "judge" else {x: dict(+letters[x]) for x in LETTERS},  # + drops zero counts
        "answer_mass_mean": sum(masses) / len(masses) if masses else None,
        "needs_options": {"stem": sum(stem for stem, _ in needs), "gold_text": sum(gold for _, gold in needs),
                          "needs": _stats([ok for ok, need in zip(right, needs) if any(need)]),
                          "rest": _stats([ok for ok, need in zip(right, needs) if not any(need)])},
    }


def _cell(text, width):
    """Left-justify by display width: a CJK character takes two terminal columns."""
    text = str(text)
    shown = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return text + " " * max(0, width - shown)


def _pct(s):
    return "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f}% of {s['n']}"


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
    notes += [f"rows dropped at load: {report['dropped_at_load']['n']}"]
    out.append("; ".join(notes))
    out.append(f"strict (skipped, missing and truncated counted wrong): {_pct(report['strict'])}; "
               f"finished replies only: {_pct(report['finished_only'])}")
    if report["letters"]:
        out.append("letters predicted / gold: " + ", ".join(
            f"{x} {c.get('predicted', 0)}/{c.get('gold', 0)}" for x, c in report["letters"].items()))
    if report["answer_mass_mean"] is not None:
        out.append(f"mean probability on the answer tokens: {report['answer_mass_mean']:.3f}")
    need = report["needs_options"]
    out.append(f"questions that need their options (stem {need['stem']}, gold text {need['gold_text']}): "
               f"{_pct(need['needs'])}; the rest: {_pct(need['rest'])}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------------------
# Paired comparison of two runs on the same questions, and the judge's calibration against exact match.


def paired_ci(a, b, c, d, z=1.959963984540054):
    """95% interval for p1 - p2 = (b - c) / n from a paired 2x2 table (a both right, b only the first, c only the
    second, d neither): Newcombe, Statistics in Medicine 17:2635 (1998), method 10, the Wilson intervals of p1 and
    p2 combined with their correlation phi (continuity-corrected, and 0 where a margin is empty)."""
    n = a + b + c + d
    if n == 0:
        return None
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n, z), wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    ad_bc = a * d - b * c
    corrected = ad_bc - n / 2 if ad_bc > n / 2 else (0 if ad_bc >= 0 else ad_bc)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    lower = p1 - p2 - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = p1 - p2 + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return [max(-1.0, lower), min(1.0, upper)]


def mcnemar_exact(b, c):
    """Exact two-sided McNemar p-value: the binomial test of b successes in b + c trials at 1/2, in integers."""
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** (b + c))  # int / int: exact until the float it is returned as


def compare_predictions(preds_a, preds_b) -> dict:
    """Paired comparison of two prediction lists of one protocol, on the n questions both scored (same gold, skipped
    in neither): the 2x2 table, both accuracies, their difference with paired_ci and mcnemar_exact, and how many
    questions were left out (in one list alone, or skipped by one run)."""
    protocols = protocol_of(preds_a), protocol_of(preds_b)
    if protocols[0] != protocols[1]:
        raise ValueError(f"cannot pair runs of different protocols: {protocols[0]} vs {protocols[1]}")
    a, b = ({rec["id"]: rec for rec in preds} for preds in (preds_a, preds_b))
    both = [i for i in a if i in b]
    differ = [i for i in both if a[i]["gold"] != b[i]["gold"]]
    if differ:
        raise ValueError(f"{len(differ)} questions (e.g. id {differ[0]}) have other gold answers: not the same data")
    paired = [i for i in both if not a[i].get("skipped") and not b[i].get("skipped")]
    table = Counter((credited(a[i]), credited(b[i])) for i in paired)
    both_right, only_a, only_b, neither = table[True, True], table[True, False], table[False, True], table[False, False]
    n = len(paired)
    return {"protocol": protocols[0], "n": n, "both_right": both_right, "only_a": only_a, "only_b": only_b,
            "neither": neither, "accuracy_a": (both_right + only_a) / n if n else None,
            "accuracy_b": (both_right + only_b) / n if n else None,
            "difference": (only_a - only_b) / n if n else None, "ci95": paired_ci(both_right, only_a, only_b, neither),
            "mcnemar_p": mcnemar_exact(only_a, only_b), "only_in_a": len(a) - len(both),
            "only_in_b": len(b) - len(both), "skipped_a": sum(bool(a[i].get("skipped")) for i in both),
            "skipped_b": sum(bool(b[i].get("skipped")) for i in both)}


def format_comparison(c, name_a="A", name_b="B") -> str:
    def acc(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    diff = "-" if c["difference"] is None else f"{100 * c['difference']:+.1f} points"
    ci = "" if c["ci95"] is None else f", 95% CI [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}] (paired)"
    return "\n".join([
        f"paired comparison, protocol {c['protocol']}: A = {name_a}, B = {name_b}",
        f"{c['n']} questions scored in both    B right  B wrong",
        f"  A right                      {c['both_right']:>7}  {c['only_a']:>7}",
        f"  A wrong                      {c['only_b']:>7}  {c['neither']:>7}",
        f"accuracy A {acc(c['accuracy_a'])}, B {acc(c['accuracy_b'])}; A - B {diff}{ci}; "
        f"exact McNemar p = {c['mcnemar_p']:.4g} ({c['only_a'] + c['only_b']} questions flipped)",
        f"left out: only in A {c['only_in_a']}, only in B {c['only_in_b']}, skipped in A {c['skipped_a']}, "
        f"skipped in B {c['skipped_b']}"])


def predictions_file(path):
    """A predictions file, or a run folder holding exactly one *.predictions.jsonl."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*.predictions.jsonl"))
        if len(found) != 1:
            raise SystemExit(f"{path}: expected one *.predictions.jsonl, found {[f.name for f in found]}; "
                             "name the file")
        path = found[0]
    if not path.is_file():
        raise SystemExit(f"{path}: no such predictions file")
    return path


def calibrate(judge, rows, cot_path, out_path) -> dict:
    """Judge the cot replies of `cot_path` whose exact-match verdict is known (scored, finished), and count how
    often the judge agrees with exact match (and Cohen's kappa). Resumable like a run."""
    rows_by_id = {row["id"]: row for row in rows}
    known = [rec for rec in read_jsonl(predictions_file(cot_path)) if rec["id"] in rows_by_id
             and rec["mode"] == "cot" and not rec.get("skipped") and rec.get("finished") is not False]
    rejudge(judge, rows_by_id, out_path)
    done = {rec["id"] for rec in read_jsonl(out_path)}
    todo = [{**rec, "mode": "judge", "exact_match": credited(rec)} for rec in known if rec["id"] not in done]
    with open(out_path, "a", encoding="utf-8") as f:
        for rec in judged(judge, rows_by_id, todo):
            append_jsonl(f, rec)
    scored = [rec for rec in read_jsonl(out_path) if not rec.get("skipped")]
    cells = Counter((bool(rec["correct"]), rec["exact_match"]) for rec in scored)  # (judge, exact match)
    rr, rw, wr, ww = cells[True, True], cells[True, False], cells[False, True], cells[False, False]
    n = len(scored)
    agree = (rr + ww) / n if n else None
    chance = ((rr + rw) * (rr + wr) + (wr + ww) * (rw + ww)) / n ** 2 if n else None  # Cohen's, from the margins
    return {"protocol": f"judge/{judge.protocol}", "cot_predictions": str(cot_path), "judged": n,
            "judge_failures": len(known) - n, "agreement": agree,
            "kappa": (agree - chance) / (1 - chance) if n and chance < 1 else None,
            "judge_right_exact_right": rr, "judge_right_exact_wrong": rw, "judge_wrong_exact_right": wr,
            "judge_wrong_exact_wrong": ww}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def select_rows(path, limit=None, sample=None, seed=0, return_dropped=False):
    rows, dropped = load_cmexam(path, return_skipped=True)
    check_unique_ids(rows, path)
    if sample is not None:
        picked = set(random.Random(seed).sample(range(len(rows)), min(sample, len(rows))))
        rows = [row for i, row in enumerate(rows) if i in picked]
    return (rows[:limit], dropped) if return_dropped else rows[:limit]


def compare_runs(a, b, out=None) -> dict:
    files = [predictions_file(p) for p in (a, b)]
    result = {**compare_predictions(*map(read_jsonl, files)), "a": str(files[0]), "b": str(files[1])}
    print(format_comparison(result, *files))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def load_student(args):
    """The model (model.load, or a Server at --base-url) and its tokenizer; refuses a mismatched vocabulary and
    non-finite weights."""
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.base_url:
        config = ModelConfig.from_hf(json.loads((Path(args.model) / "config.json").read_text()))
        try:
            name = args.served_model or served_models(args.base_url)[0]
        except (TeacherError, IndexError) as e:
            raise SystemExit(f"{args.base_url}/v1/models did not list a model ({e!r}); is the server up?") from None
        model = Server(args.base_url, name, config, args.server_concurrency)
    else:
        model = load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.get_vocab_size()} ids, model only {model.config.vocab_size}")
    broken = [] if args.base_url else [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if broken:
        raise UserError(f"{args.model}: non-finite weights in {len(broken)} tensors (e.g. {broken[0]}): refusing to "
                        "score a broken checkpoint")
    return model, tokenizer


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="Hugging Face Qwen2 checkpoint folder")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json, if not --model")
    parser.add_argument("--data", help="CMExam .csv/.json/.jsonl (official test_with_annotations.csv)")
    parser.add_argument("--out", help="folder for <mode>.predictions.jsonl, .report.json, .run.json")
    parser.add_argument("--mode", choices=PROTOCOLS, default="cot")
    parser.add_argument("--judge-protocol", choices=JUDGE_PROTOCOLS, default="authors",
                        help="judge mode: the authors' scripts exactly, or our stricter rubric")
    parser.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                        help="paired comparison of two prediction files (or run folders) of one protocol; "
                             "writes <out>/compare.json if --out is given")
    parser.add_argument("--judge-calibrate", metavar="COT_PREDICTIONS",
                        help="judge mode without a model: judge these cot replies, report agreement with exact match")
    pick = parser.add_mutually_exclusive_group()
    pick.add_argument("--limit", type=positive_int, help="only the first N questions of the file")
    pick.add_argument("--sample", type=positive_int, help="a random N questions (seeded by --sample-seed)")
    parser.add_argument("--sample-seed", type=int, default=0, help="for --sample")
    parser.add_argument("--seed", type=int, default=0, help="for sampling at --temperature > 0")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="questions per generate call / forward")
    parser.add_argument("--max-new-tokens", type=positive_int, help="(default: 8192; 450 for authors)")
    parser.add_argument("--temperature", type=nonnegative_float, help="(default: 0 = greedy; 0.7 for authors)")
    parser.add_argument("--top-p", type=probability, help="(default: 1.0; 0.9 for authors)")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--base-url", help="cot/judge: generate with this OpenAI-compatible server (vLLM; key, if "
                        "any, from $OPENAI_API_KEY), not model.generate")
    parser.add_argument("--served-model", help="the model name the server serves (default: the first it lists)")
    parser.add_argument("--server-concurrency", type=int, default=64, help="requests in flight to --base-url")
    for field in dataclasses.fields(TeacherConfig):  # the judge endpoint, judge mode only
        per_protocol = field.name in JUDGE_SAMPLING["authors"]
        parser.add_argument("--judge-" + field.name.replace("_", "-"), type=teacher_arg_type(field),
                            default=None if per_protocol else field.default,
                            help=f"judge mode: TeacherConfig.{field.name}" + (" (default: per --judge-protocol)"
                                                                              if per_protocol else ""))
    parser.add_argument("--judge-allowed-token-ids", default=",".join(map(str, AUTHORS_VERDICT_IDS)),
                        help="authors: the judge's ids of '1' and '2', sent as vLLM's allowed_token_ids with top_k 2 "
                             "as ForJudge.py does; 'none' for a server that rejects those fields")
    args = parser.parse_args(argv)
    if args.base_url and args.mode == "direct":
        parser.error("--base-url generates (cot, judge); direct mode reads next-token scores from the model itself")
    if args.compare:
        return compare_runs(*args.compare, args.out)
    if not args.data or not args.out or not (args.model or args.judge_calibrate):
        parser.error("--data, --out and --model are required (--model not with --judge-calibrate)")
    defaults = {**STUDENT_SAMPLING[args.judge_protocol if args.mode == "judge" else "cot"],
                **{"judge_" + name: value for name, value in JUDGE_SAMPLING[args.judge_protocol].items()}}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    rows, dropped = select_rows(args.data, args.limit, args.sample, args.sample_seed, return_dropped=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.mode}.predictions.jsonl"
    lock_output(path)  # one writer per mode: two would append twice
    extra = {}
    if args.judge_protocol == "authors" and args.judge_allowed_token_ids.lower() != "none":
        extra = {"top_k": 2, "allowed_token_ids": [int(i) for i in args.judge_allowed_token_ids.split(",")]}
    cfg = TeacherConfig(**{f.name: getattr(args, "judge_" + f.name) for f in dataclasses.fields(TeacherConfig)})
    judge = Judge(cfg, args.judge_protocol, extra)
    if args.judge_calibrate:
        calibration = out / f"judge-{args.judge_protocol}.calibration.jsonl"
        result = calibrate(judge, rows, args.judge_calibrate, calibration)
        calibration.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return result
    # Settings that change a prediction: a resumed run must use the same ones, or its file would mix two runs.
    settings = {"mode": args.mode, "model": str(Path(args.model).resolve()), "dtype": args.dtype}
    if args.mode != "direct":
        settings.update(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed if args.temperature > 0 else None)
    if args.mode == "judge":
        settings.update(judge_protocol=args.judge_protocol, judge_model=judge.cfg.model,
                        judge_temperature=judge.cfg.temperature, judge_top_p=judge.cfg.top_p,
                        judge_max_tokens=judge.cfg.max_tokens, judge_extra=extra)
    if args.base_url:  # the server's own numerics (and dtype) make the predictions
        settings.update(server=args.base_url, dtype=None)
    run_file = out / f"{args.mode}.run.json"
    check_settings(run_file, settings, write=False)
    model, tokenizer = load_student(args)
    if args.mode == "judge" and (n := rejudge(judge, {row["id"]: row for row in rows}, path)):
        print(f"re-judged {n} stored replies whose judge call had failed")
    check_settings(run_file, settings)  # written only now: a mistyped --model records nothing
    run(model, tokenizer, rows, args, path, judge if args.mode == "judge" else None)
    report = {**score(read_jsonl(path), rows, dropped), "settings": {**settings, "data": args.data}}
    (out / f"{args.mode}.report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(format_report(report))
    return report


if __name__ == "__main__":
    run_main(main)
