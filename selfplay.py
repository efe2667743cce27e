"""
selfplay.py: MedCritical Stage 2 data (Su et al., arXiv 2509.23368). The fine-tuned student answers training
questions, critiques and corrects its own wrong answers, and each correction that reaches the gold answer becomes a
DPO pair against the wrong answer (preference_pairs); --correction step is the Step-DPO variant (Lai et al. 2024).
With --rounds R it alternates this with DPO: each round's model is the next round's student. No teacher is called.
The README gives the options, the 8-GPU setups and their costs.

    python selfplay.py --model runs/sft/step-000800 --data train.csv --out runs/selfplay     # round 1's pairs only
    python selfplay.py --model runs/sft/step-000800 --data train.csv --out runs/selfplay --rounds 2 --nproc 8 \\
        --dpo-args "--precompute-ref --rpo-alpha 1"  # each round: 8 sampling processes, merge, torchrun dpo.py
    python selfplay.py ... --rounds 2 --nproc 8 --serve "vllm serve {model} --port {port} --dtype bfloat16"
    # the manual shard loop, for round K (--model: round K-1's checkpoint; round 1: the SFT model)
    for i in $(seq 0 7); do CUDA_VISIBLE_DEVICES=$i python selfplay.py ... --round K --shard $i --num-shards 8 & done
    wait; python selfplay.py ... --round K --num-shards 8 --merge

DPO runs as a child process, exactly the command users run: `torchrun --nproc-per-node N dpo.py ...` (plain
`python dpo.py` for N = 1).
"""
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from model import ModelConfig, generate, load, load_tokenizer, sample_next
from sft import latest_checkpoints
from templates import (ArgumentParser, Server, TeacherError, UserError, append_jsonl, chat, check_settings,
                       check_unique_ids, completions, critique_messages, die_with_parent, done_ids, extract_answer,
                       extract_correction, extract_first_wrong_line, is_well_formed, load_cmexam, lock_output,
                       nonnegative_float, nonnegative_int, positive_float, positive_int, probability, prompt_reference,
                       read_jsonl, reply_text, run_main, served_models, step_critique_messages, stop_ids,
                       student_messages, write_jsonl)

# ----------------------------------------------------------------------------------------------------------------
# Config. Defaults are for Qwen2.5-7B: at its ~70% accuracy on CMExam, 1 - 0.7^4 = 76% of questions have at least
# one wrong sample in k = 4, and m = 2 corrections give each a second chance for 2x the critique cost. Temperature
# 0.7 / top_p 0.9 sit between Qwen2.5-Instruct's own generation_config (0.7 / 0.8, top_k 20) and the authors' teacher
# (0.5 / 0.9): hot enough for varied mistakes and corrections, cool enough for a coherent long chain of thought.


@dataclasses.dataclass
class SelfPlayConfig:
    samples: int = 4  # k trajectories per question
    corrections: int = 2  # m critiques (each with a corrected solution) per wrong trajectory
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 2048  # one student answer; raise it if the summary shows many truncated
    critique_max_new_tokens: int = 4096  # a critique and then a whole corrected answer
    sources: str = "correction"  # how a chosen may be found: "correction", "sample" or "correction,sample"
    hint: bool = False  # show the gold answer to the corrector (never the default; every record says if it was on)
    correction: str = "rewrite"  # "rewrite": a critique then a whole new solution (the paper); "step": Step-DPO
    locate: str = "critique"  # --correction step: the first wrong line named by a critique, or "confidence"
    verify: str = ""  # "file.py:function": a check (text -> bool) every chosen reply must also pass
    seed: int = 0
    batch_size: int = 16  # prompts per generate call (x samples rows): the KV cache is batch x (prompt + new)
    chunk_size: int = 64  # questions per committed chunk: a kill loses at most one chunk of work
    compile: bool = False  # our sampler: torch.compile the decode step (model.generate(compile=True))


# These change which random draws are made (or how fast they are made), not what is sampled from.
RUN_ONLY = ("batch_size", "chunk_size", "compile")


# ----------------------------------------------------------------------------------------------------------------
# Stage 2's pair rule: a right correction of a wrong sample is `chosen`, the wrong sample `rejected`. A correction
# answers the ORIGINAL question on its own, so both share one prompt: the student's. Only finished replies enter a
# pair: one cut off at max_new_tokens would be trained as if the model had ended it there.


def preference_pairs(row, samples, cfg, round_) -> list:
    """The pairs of one question from its graded samples, each finished wrong one with its graded corrections.
    --sources ...,sample also pairs each right sample against each wrong one (off by default: the paper builds
    pairs from corrections)."""
    pairs, answer = [], row["answer"]
    for s, wrong in enumerate(samples):
        for c, fix in enumerate(wrong.get("corrections", [])):
            if cfg.correction == "step" and step_pair_ok(fix, answer):
                pairs.append(pair_record(row, fix["text"], wrong["text"], round=round_, sample=s, source="step",
                                         correction=c, line=fix["line"], locate=cfg.locate, hint=cfg.hint,
                                         answer=answer, rejected_answer=wrong["predicted"]))
            elif cfg.correction == "rewrite" and rewrite_pair_ok(fix, cfg):
                pairs.append(pair_record(row, extract_correction(fix["text"]), wrong["text"], round=round_, sample=s,
                                         source="correction", correction=c, hint=cfg.hint, answer=answer,
                                         rejected_answer=wrong["predicted"]))
    if "sample" in cfg.sources.split(","):  # every (right, wrong) combination of the finished samples
        finished = [(s, x) for s, x in enumerate(samples) if x["finished"]]
        for s_right, right in finished:
            for s_wrong, wrong in finished:
                if right["right"] and right["well_formed"] and not wrong["right"] and verified(cfg, right["text"]):
                    pairs.append(pair_record(row, right["text"], wrong["text"], round=round_, sample=s_wrong,
                                             source="sample", chosen_sample=s_right, hint=False, answer=answer,
                                             rejected_answer=wrong["predicted"]))
    return pairs


def rewrite_pair_ok(correction, cfg) -> bool:
    """The paper's rule. Chosen: the solution after the critique, if the critique ended by itself and the solution
    reaches the gold answer, is well formed, does not refer to the critique prompt and passes --verify."""
    return (correction["finished"] and correction["right"] and correction["well_formed"]
            and not correction["refers_to_prompt"] and verified(cfg, extract_correction(correction["text"])))


def step_pair_ok(correction, answer) -> bool:
    """The pair rule of --correction step. Chosen: a rewrite that ended by itself, did not rebuild the excluded
    line, reaches the gold answer, is well formed and passes --verify. Rejected: the wrong sample. Their lines
    before the rewritten one are the same bytes, so dpo.py --truncate-rejected cuts the rejected reply exactly at
    the wrong step."""
    return (correction["finished"] and not correction["reemitted"] and correction["predicted"] == answer
            and correction["well_formed"] and correction["verified"])


def pair_record(row, chosen, rejected, **meta):
    """A preference pair in the conversational format TRL's DPOTrainer reads, plus our metadata."""
    return {"prompt": student_messages(row), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "id": row["id"], **meta}


def pair_key(pair):
    text = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def load_check(spec):
    """The function named by --verify "path/to/file.py:function"."""
    path, _, name = spec.rpartition(":")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if not path or module_spec is None:
        raise ValueError(f"--verify {spec!r}: expected path/to/file.py:function")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def verified(cfg, text) -> bool:
    return not cfg.verify or bool(load_check(cfg.verify)(text))


# ----------------------------------------------------------------------------------------------------------------
# Sampling. The one function that calls the model (ours, or one an inference server serves); tests swap it for a
# scripted one.


def prompt_ids(tokenizer, messages):
    """Token ids of the chat text up to `<|im_start|>assistant\\n`: what encode_chat puts before a reply."""
    return tokenizer.encode(chat(messages), add_special_tokens=False).ids


def sample_texts(model, tokenizer, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
    """num_samples completions of each token-id prompt, in input order: [[(text, finished, tokens), ...], ...].

    Prompts are sorted by length and batched, so a batch holds similar lengths (little left padding, and short
    prompts do not wait on long ones); each prompt is prefilled once and its cache shared by its num_samples rows.
    The seed of each batch depends only on `seed` and the batch's place in the sorted order, so the same chunk
    always draws the same samples. heads[i], if given, are decoded in front of prompt i's reply (reply_text).

    With a Server, each prompt is one request for its num_samples completions of the prompt's text (the decoded
    ids: templates.chat's text, which encodes back to the same ids), seeded by `seed` and its place; `tokens` is
    then the text's re-encoded length (plus the stop token)."""
    stop = stop_ids(tokenizer)
    if isinstance(model, Server):
        texts = [tokenizer.decode(p, skip_special_tokens=False) for p in prompts]
        try:
            outputs = completions(model, texts, num_samples, max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                                  stop, seed=seed)
        except TeacherError as e:
            raise UserError(f"server {model.base_url} failed: {e}; rerun the same command to resume") from None
        return [[(text, finished, len(tokenizer.encode(text, add_special_tokens=False).ids) + finished)
                 for text, finished in samples] for samples in outputs]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = [None] * len(prompts)
    for start in range(0, len(order), cfg.batch_size):
        batch = order[start:start + cfg.batch_size]
        rows = generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=cfg.temperature,
                        top_k=cfg.top_k, top_p=cfg.top_p, stop_ids=stop, num_samples=num_samples, seed=seed + start,
                        compile=cfg.compile)
        for j, i in enumerate(batch):
            results[i] = [(*reply_text(tokenizer, row, heads[i] if heads else ()), len(row))
                          for row in rows[j * num_samples:(j + 1) * num_samples]]
    return results


def sample_fitting(model, tokenizer, prompts, num_samples, max_new_tokens, cfg, seed, heads=None):
    """sample_texts of the prompts that fit the context with max_new_tokens more; None for each that does not."""
    context = model.config.max_position_embeddings
    fits = [i for i, p in enumerate(prompts) if len(p) + max_new_tokens <= context]
    outputs = sample_texts(model, tokenizer, [prompts[i] for i in fits], num_samples, max_new_tokens, cfg, seed,
                           heads=[heads[i] for i in fits] if heads else None)
    results = [None] * len(prompts)
    for i, output in zip(fits, outputs):
        results[i] = output
    return results


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


# ----------------------------------------------------------------------------------------------------------------
# One chunk of questions: sample, grade, critique and correct the wrong samples, pair.


def run_chunk(model, tokenizer, rows, cfg, round_, seed):
    """(per-question records, candidate pairs) for one chunk. A prompt that cannot fit the context with its
    max_new_tokens is a recorded skip."""
    records = [{"id": row["id"], "round": round_, "answer": row["answer"], "hint": cfg.hint, "skipped": None,
                "samples": []} for row in rows]
    prompts = [prompt_ids(tokenizer, student_messages(row)) for row in rows]
    outputs = sample_fitting(model, tokenizer, prompts, cfg.samples, cfg.max_new_tokens, cfg, seed_of(seed, "samples"))
    for row, record, samples in zip(rows, records, outputs):
        if samples is None:
            record["skipped"] = "too_long"
        for text, finished, tokens in samples or []:
            predicted = extract_answer(text)
            record["samples"].append({"predicted": predicted, "right": predicted == row["answer"],
                                      "finished": finished, "tokens": tokens, "well_formed": is_well_formed(text),
                                      "text": text})
    if "correction" in cfg.sources.split(","):  # with --sources sample alone corrections would go unused
        wrong = [(row, sample) for row, record in zip(rows, records) for sample in record["samples"]
                 if sample["finished"] and not sample["right"]]
        correct = step_corrections if cfg.correction == "step" else rewrite_corrections
        correct(model, tokenizer, wrong, cfg, seed)
    pairs = [preference_pairs(row, record["samples"], cfg, round_) for row, record in zip(rows, records)]
    return records, [pair for question_pairs in pairs for pair in question_pairs]


def rewrite_corrections(model, tokenizer, wrong, cfg, seed):
    """The paper's correction, into each wrong (row, sample)'s "corrections": the SAME model reads the wrong
    trajectory (templates.critique_messages) and samples m critiques, each ending in a complete new solution."""
    critiques = [prompt_ids(tokenizer, critique_messages(row, sample["text"], row["answer"] if cfg.hint else None))
                 for row, sample in wrong]
    outputs = sample_fitting(model, tokenizer, critiques, cfg.corrections, cfg.critique_max_new_tokens, cfg,
                             seed_of(seed, "corrections"))
    for (row, sample), tries in zip(wrong, outputs):
        if tries is None:
            sample["critique"] = "too_long"
            continue
        sample["corrections"] = []
        for text, finished, tokens in tries:
            solution = extract_correction(text)
            predicted = extract_answer(solution)
            sample["corrections"].append({"predicted": predicted, "right": predicted == row["answer"],
                                          "marked": bool(solution), "well_formed": is_well_formed(solution),
                                          "finished": finished, "tokens": tokens,
                                          "refers_to_prompt": prompt_reference(solution, cfg.hint), "text": text})


# ----------------------------------------------------------------------------------------------------------------
# --correction step (Step-DPO, Lai et al. 2024; the README says what it does). The first wrong line is named by the
# model's own critique (templates.step_critique_messages) or is the line of its least likely token (--locate
# confidence). The rewrite continues the student's own reply to the student prompt (not hundreds of tokens into a
# critique prompt) from that line's least confident token, the one it was decided on: the tokens before it are kept
# (an option line keeps its letter and name), that token is masked with the stop tokens (a step is not rewritten by
# ending the reply) and the first new token is drawn from the rest (at temperature 0: the model's next-best choice).
# Another tokenization could still rebuild the line, so a rewrite equal to the excluded line is dropped and counted
# (`reemitted`). Needs the model in this process (log-probs), so not a sampling server.


def step_line_numbers(reply) -> list:
    """0-based indices of the lines that can be a first wrong step: the non-empty lines inside <think>...</think>
    (every non-empty line of a reply without </think>)."""
    lines = reply.split("\n")
    end = next((k for k, line in enumerate(lines) if "</think>" in line), len(lines))
    return [k for k, line in enumerate(lines[:end]) if line.strip() and line.strip() != "<think>"]


@torch.no_grad()
def token_logprobs(model, ids, start):
    """log p(ids[t] | ids[:t]) for t = start .. len(ids)-1 (a list), and the logits rows that predicted them. One
    forward; the log-softmax in fp32, 1,024 rows at a time (a 7B vocabulary is 152k wide)."""
    x = torch.tensor([ids], device=model.embed_tokens.weight.device)
    logits = model(x)[0, start - 1:-1]
    logps = [rows.float().gather(-1, t[:, None])[:, 0] - rows.float().logsumexp(-1)
             for rows, t in zip(logits.split(1024), x[0, start:].split(1024))]
    return torch.cat(logps).tolist(), logits


def least_confident_line(model, tokenizer, prompt, reply):
    """--locate confidence: the step line holding the reply's least likely token under the model (None if none)."""
    enc = tokenizer.encode(reply, add_special_tokens=False)
    logps, _ = token_logprobs(model, prompt + enc.ids, len(prompt))
    candidates, worst = set(step_line_numbers(reply)), {}
    for logp, (start, _) in zip(logps, enc.offsets):
        k = reply.count("\n", 0, start)
        if k in candidates:
            worst[k] = min(worst.get(k, 0.0), logp)
    return min(worst, key=worst.get) if worst else None


def located_lines(model, tokenizer, wrong, prompts, cfg, seed):
    """Per wrong (row, sample): m (0-based first wrong line or None, critique text or None, critique tokens), or
    None if its critique prompt does not fit. With --locate critique each has its own sampled critique (as the
    rewrite mode has m critiques); with --locate confidence the m rewrites share the one located line."""
    if cfg.locate == "confidence":
        return [[(least_confident_line(model, tokenizer, prompt, sample["text"]), None, 0)] * cfg.corrections
                for prompt, (_, sample) in zip(prompts, wrong)]
    critiques = [prompt_ids(tokenizer, step_critique_messages(row, sample["text"], row["answer"] if cfg.hint else None))
                 for row, sample in wrong]
    outputs = sample_fitting(model, tokenizer, critiques, cfg.corrections, cfg.critique_max_new_tokens, cfg,
                             seed_of(seed, "step critiques"))
    located = []
    for (_, sample), tries in zip(wrong, outputs):
        if tries is None:
            located.append(None)
            continue
        steps = step_line_numbers(sample["text"])
        named = [extract_first_wrong_line(text) for text, _, _ in tries]  # 1-based, as the critique numbers lines
        located.append([(n - 1 if n and n - 1 in steps else None, text, tokens)
                        for n, (text, _, tokens) in zip(named, tries)])
    return located


def diverge(model, tokenizer, prompt, reply, k, cfg, seed):
    """Where a rewrite of line k starts: (the reply's lines before k as text, the ids to continue from after the
    prompt, the head of them decoded with the continuation, the token index in line k where it differs)."""
    lines = reply.split("\n")
    prefix = "".join(line + "\n" for line in lines[:k])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    prefix_ids, both = encode(prefix), encode(prefix + lines[k])
    line_ids = both[len(prefix_ids):] if both[:len(prefix_ids)] == prefix_ids else encode(lines[k])
    logps, logits = token_logprobs(model, prompt + prefix_ids + line_ids, len(prompt) + len(prefix_ids))
    j = min(range(len(line_ids)), key=logps.__getitem__)
    row = logits[j:j + 1].float().clone()
    row[0, [line_ids[j], *stop_ids(tokenizer)]] = float("-inf")
    generator = torch.Generator(device=row.device).manual_seed(seed)
    head = line_ids[:j] + [int(sample_next(row, cfg.temperature, cfg.top_k, cfg.top_p, generator)[0])]
    return prefix, prefix_ids + head, head, j


def step_corrections(model, tokenizer, wrong, cfg, seed):
    """m step corrections of each wrong (row, sample) into its "corrections" (step_pair_ok makes the pairs)."""
    prompts = [prompt_ids(tokenizer, student_messages(row)) for row, _ in wrong]
    located = located_lines(model, tokenizer, wrong, prompts, cfg, seed)
    jobs = []  # (its record entry, the wrong sample, its kept lines, continuation prompt, its head ids)
    for j, (prompt, (row, sample), tries) in enumerate(zip(prompts, wrong, located)):
        if tries is None:
            sample["critique"] = "too_long"
            continue
        sample["corrections"] = []
        for c, (k, critique, tokens) in enumerate(tries):
            entry = {"line": None if k is None else k + 1, "critique": critique, "marked": k is not None,
                     "predicted": "", "right": False, "well_formed": False, "finished": True,
                     "reemitted": False, "verified": False, "tokens": tokens, "text": ""}
            sample["corrections"].append(entry)
            if k is not None:
                prefix, ids, head, entry["token"] = diverge(model, tokenizer, prompt, sample["text"], k, cfg,
                                                            seed_of(seed, "diverge", j, c))
                jobs.append((entry, row, sample, prefix, prompt + ids, head))
    outputs = sample_fitting(model, tokenizer, [job[4] for job in jobs], 1, cfg.max_new_tokens, cfg,
                             seed_of(seed, "step rewrites"), heads=[job[5] for job in jobs])
    for (entry, row, sample, prefix, _, _), output in zip(jobs, outputs):
        if output is None:
            entry["skipped"] = "too_long"
            continue
        [(rest, finished, tokens)] = output
        text, k = prefix + rest, entry["line"] - 1
        entry.update(text=text, finished=finished, tokens=entry["tokens"] + tokens, predicted=extract_answer(text),
                     well_formed=is_well_formed(text), reemitted=text.split("\n")[k] == sample["text"].split("\n")[k])
        entry.update(right=entry["predicted"] == row["answer"], verified=verified(cfg, text))


# ----------------------------------------------------------------------------------------------------------------
# A round's files. Round k lives in <out>/round_k/: pairs.jsonl (TRL's conversational preference format plus
# metadata), samples.jsonl (per question: each sample and each critique, its full text and what it answered, so any
# pair or failure can be read back), summary.json, config.json and, with --rounds, the DPO run in dpo/ and done.json
# naming its final checkpoint. Both JSONL files grow one chunk of questions at a time, samples.jsonl last, so it is
# the commit log: a killed run resumes at the first uncommitted chunk with nothing lost or duplicated.


def shard_suffix(shard, num_shards):
    return "" if num_shards == 1 else f".shard{shard}of{num_shards}"


def read_committed(pairs_path, samples_path):
    """(records, pairs) already committed. samples.jsonl is written after pairs.jsonl for each chunk, so pairs
    of questions it does not list come from a chunk that was killed mid-write: they are dropped (and remade)."""
    records, pairs = read_jsonl(samples_path), read_jsonl(pairs_path)
    done = done_ids(samples_path, records)
    committed = [pair for pair in pairs if pair["id"] in done]
    if len(committed) < len(pairs):
        write_jsonl(pairs_path, committed)
    return records, committed


def check_config(out_dir, cfg):
    """Refuse to resume a round with other sampling settings (shard processes started together all call this)."""
    check_settings(out_dir / "config.json", {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY})


def shard_chunks(rows, chunk_size, shard=0, num_shards=1):
    """[(c, chunk)]: this shard's chunks. Chunks are cut from the whole question list and dealt round-robin, and a
    chunk's seed is its global index c, so a chunk draws the same samples whichever process runs it: the pairs do
    not depend on the number of shards (nor on resuming, since chunks are never cut from what is left)."""
    chunks = [rows[i:i + chunk_size] for i in range(0, len(rows), chunk_size)]
    return [(c, chunk) for c, chunk in enumerate(chunks) if c % num_shards == shard]


def run_round(model_path, tokenizer, rows, out_dir, cfg, round_=1, shard=0, num_shards=1, device="cpu",
              dtype=torch.float32, server=None) -> dict:
    """Round `round_`'s pairs from the model at `model_path` for this shard's chunks of questions (shard_chunks),
    resuming whatever `out_dir` already holds, sampling with our sampler or from `server` (a Server serving
    `model_path`). Returns the summary (also printed and written as JSON)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    check_config(out_dir, cfg)
    suffix = shard_suffix(shard, num_shards)
    pairs_path, samples_path = out_dir / f"pairs{suffix}.jsonl", out_dir / f"samples{suffix}.jsonl"
    records, pairs = read_committed(pairs_path, samples_path)
    done, seen = {r["id"] for r in records}, {pair_key(p) for p in pairs}
    todo = [(c, chunk) for c, chunk in shard_chunks(rows, cfg.chunk_size, shard, num_shards)
            if any(row["id"] not in done for row in chunk)]
    if todo:
        model = server or load(model_path, dtype=dtype, device=device)
        with open(pairs_path, "a", encoding="utf-8") as pairs_file, \
                open(samples_path, "a", encoding="utf-8") as samples_file:
            bar = tqdm(todo, desc=f"round {round_} chunks", dynamic_ncols=True)
            for c, chunk in bar:
                chunk_records, candidates = run_chunk(model, tokenizer, chunk, cfg, round_,
                                                      seed_of(cfg.seed, round_, c))
                # a chunk killed mid-commit is sampled again whole, but only its uncommitted questions are written
                new = {r["id"]: {**r, "pairs": 0, "duplicates": 0} for r in chunk_records if r["id"] not in done}
                fresh = []
                for pair in candidates:
                    if pair["id"] not in new:  # its question was committed before the kill
                        continue
                    key = pair_key(pair)
                    new[pair["id"]]["duplicates" if key in seen else "pairs"] += 1
                    if key not in seen:
                        seen.add(key)
                        fresh.append(pair)
                for pair in fresh:
                    append_jsonl(pairs_file, pair)
                for record in new.values():
                    append_jsonl(samples_file, record)
                records += new.values()
                pairs += fresh
                n = tally(records)
                bar.set_postfix(acc=f"{n['samples_right'] / max(n['samples'], 1):.3f}", pairs=len(pairs))
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the DPO subprocess needs this GPU next
    return write_summary(out_dir / f"summary{suffix}.json", records, pairs, model_path, round_)


def tally(records) -> Counter:
    """Raw counts over per-question records; write_summary() turns them into the summary."""
    n = Counter()
    for record in records:
        if record["skipped"]:
            n["questions_skipped_too_long"] += 1
            continue
        right = [s["right"] for s in record["samples"]]
        n.update(questions=1, samples=len(right), samples_right=sum(right), questions_all_right=all(right),
                 questions_any_right=any(right), duplicate_pairs=record["duplicates"])
        for s in record["samples"]:
            corrections = s.get("corrections", [])
            n.update(no_answer=s["predicted"] == "", truncated=not s["finished"], sample_tokens=s["tokens"],
                     critique_skipped_too_long=s.get("critique") == "too_long", correction_attempts=len(corrections),
                     wrong_samples_corrected=any(c["right"] for c in corrections))
            n.update(wrong_samples_sent_to_critique=bool(corrections) or s.get("critique") == "too_long")
            for c in corrections:
                n.update(corrections_right=c["right"], corrections_unmarked=not c["marked"],
                         corrections_truncated=not c["finished"], correction_tokens=c["tokens"],
                         corrections_malformed=c["marked"] and not c["well_formed"],
                         corrections_right_dropped_prompt_reference=c["right"] and bool(c.get("refers_to_prompt")),
                         corrections_reemitted=c.get("reemitted", False))
    return n


def write_summary(path, records, pairs, model_path, round_):
    """The summary (written to `path` and printed): counts and rates over the records and pairs."""
    n = tally(records)
    rate = lambda a, b: round(n[a] / n[b], 4) if n[b] else None  # noqa: E731
    counts = lambda *names: {name: n[name] for name in names}  # noqa: E731
    summary = {"round": round_, "model": str(model_path),
               **counts("questions", "questions_skipped_too_long", "samples"),
               "accuracy_per_sample": rate("samples_right", "samples"),
               "questions_all_samples_right": rate("questions_all_right", "questions"),
               "questions_any_sample_right": rate("questions_any_right", "questions"),
               **counts("no_answer", "truncated", "wrong_samples_sent_to_critique", "critique_skipped_too_long",
                        "correction_attempts", "corrections_right"),
               "correction_success_rate": rate("corrections_right", "correction_attempts"),
               **counts("wrong_samples_corrected", "corrections_unmarked", "corrections_malformed",
                        "corrections_truncated", "corrections_reemitted", "corrections_right_dropped_prompt_reference"),
               "pairs": len(pairs), "pairs_by_source": dict(sorted(Counter(p["source"] for p in pairs).items())),
               "duplicate_pairs_dropped": n["duplicate_pairs"],
               "generated_tokens": n["sample_tokens"] + n["correction_tokens"],
               "teacher_calls": 0}  # no teacher client is imported here; tests/test_selfplay.py checks it
    path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(summary, ensure_ascii=False))
    return summary


def merge_shards(out_dir, rows, num_shards, model_path, round_=1, chunk_size=SelfPlayConfig.chunk_size) -> dict:
    """Join the files of --num-shards sampling processes into pairs.jsonl / samples.jsonl (pairs deduplicated), in
    question order: the files an unsharded run writes."""
    records, pairs = [], []
    for shard in range(num_shards):
        suffix = shard_suffix(shard, num_shards)
        shard_records, shard_pairs = read_committed(out_dir / f"pairs{suffix}.jsonl",
                                                    out_dir / f"samples{suffix}.jsonl")
        mine = {row["id"] for _, chunk in shard_chunks(rows, chunk_size, shard, num_shards) for row in chunk}
        missing = mine - {r["id"] for r in shard_records}
        if missing:
            raise UserError(f"shard {shard} of {num_shards} has not finished ({len(missing)} questions left): "
                            "rerun it")
        records += shard_records
        pairs += shard_pairs
    position = {row["id"]: i for i, row in enumerate(rows)}
    records.sort(key=lambda r: position[r["id"]])
    pairs = sorted({pair_key(p): p for p in pairs}.values(), key=lambda p: position[p["id"]])
    write_jsonl(out_dir / "pairs.jsonl", pairs)
    write_jsonl(out_dir / "samples.jsonl", records)
    return write_summary(out_dir / "summary.json", records, pairs, model_path, round_)


# ----------------------------------------------------------------------------------------------------------------
# Self-iteration: sample with the current policy, train it with DPO on its own pairs, repeat.


def stop_group(proc, timeout):
    """Stop `proc`'s whole process group: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_dpo(args, model_path, pairs_path, out_dir):
    """dpo.py in a subprocess, plus the flags of --dpo-args. --resume makes a rerun continue a killed DPO run from
    its last checkpoint in out_dir. Returns the final checkpoint."""
    launcher = [sys.executable] if args.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd = [*launcher, args.dpo_script, "--model", str(model_path), "--tokenizer", str(args.tokenizer or args.model),
           "--data", str(pairs_path), "--out", str(out_dir), "--resume", *shlex.split(args.dpo_args)]
    print("+ " + shlex.join(cmd), flush=True)
    # The DPO run dies with this process: the kernel signals it if we are killed (even by kill -9), and on Ctrl-C
    # or any exception its whole process group (torchrun and its workers) is stopped here. Its own session keeps a
    # terminal's Ctrl-C from reaching it before we decide.
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=functools.partial(die_with_parent, os.getpid()))
    try:
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            stop_group(proc, 30)
    if returncode:
        raise UserError(f"DPO failed (exit {returncode}, its output is above); rerun the same command to resume")
    checkpoints = latest_checkpoints(out_dir)
    if not checkpoints:
        raise UserError(f"DPO finished but left no complete checkpoint in {out_dir}")
    return checkpoints[-1]


def shard_command(args, cfg, model_path, round_, shard):
    """The command line of one sampling process: this run's settings, for one shard of round `round_`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", str(model_path), "--data", str(args.data),
           "--tokenizer", str(args.tokenizer or args.model), "--out", str(args.out), "--round", str(round_),
           "--shard", str(shard), "--num-shards", str(args.nproc), "--device", args.device, "--dtype", args.dtype]
    cmd += [] if args.limit is None else ["--limit", str(args.limit)]
    for field in dataclasses.fields(SelfPlayConfig):
        flag, value = "--" + field.name.replace("_", "-"), getattr(cfg, field.name)
        cmd += ([flag] if value else []) if field.type is bool else [flag, str(value)]
    return cmd


def sample_in_processes(args, cfg, rows, round_dir, model_path, round_) -> dict:
    """Round `round_`'s pairs from args.nproc sampling processes, each running one shard (one GPU each through
    CUDA_VISIBLE_DEVICES; on CPU the cores are split between them), then merged. No collectives while sampling:
    each process works through its own chunks. A round already merged is not sampled again."""
    records, pairs = read_committed(round_dir / "pairs.jsonl", round_dir / "samples.jsonl")
    if {row["id"] for row in rows} <= {record["id"] for record in records}:
        return write_summary(round_dir / "summary.json", records, pairs, model_path, round_)
    round_dir.mkdir(parents=True, exist_ok=True)
    check_config(round_dir, cfg)  # written once, before the shards start (each then only reads it)
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
    procs = []
    for shard in range(args.nproc):
        env = dict(os.environ)
        if args.device.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = gpus[shard % len(gpus)]
        else:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
        cmd = shard_command(args, cfg, model_path, round_, shard)
        print("+ " + shlex.join(cmd), flush=True)
        procs.append(subprocess.Popen(cmd, env=env))
    failed = [shard for shard, proc in enumerate(procs) if proc.wait()]
    if failed:
        raise SystemExit(f"sampling shards {failed} of round {round_} failed (their output is above); rerun the "
                         "same command to resume")
    return merge_shards(round_dir, rows, args.nproc, model_path, round_, cfg.chunk_size)


def wait_for_server(url, proc, timeout):
    """The names the server at `url` lists, once /v1/models answers; a clear error if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before answering (its output is above)")
        try:
            return served_models(url)
        except TeacherError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}/v1/models did not answer within {timeout:.0f} s ({e})") from None
        time.sleep(1.0)


@contextlib.contextmanager
def serving(args, model_path):
    """The Server to sample from, or None for our sampler: --base-url as given, or (--serve) a server started for
    `model_path`, this round's checkpoint, and stopped (its whole process group) when sampling is done."""
    config = ModelConfig.from_hf(json.loads((Path(model_path) / "config.json").read_text()))
    if args.base_url:
        name = args.served_model or wait_for_server(args.base_url, None, args.serve_timeout)[0]
        yield Server(args.base_url, name, config, args.server_concurrency)
        return
    if not args.serve:
        yield None
        return
    port = args.serve_port
    if not port:  # a free port now; vLLM binds it a few seconds later
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    cmd = shlex.split(args.serve.format(model=shlex.quote(str(model_path)), port=port))
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group: vLLM's workers stop with it
    try:
        url = f"http://127.0.0.1:{port}"
        names = wait_for_server(url, proc, args.serve_timeout)
        yield Server(url, args.served_model or names[0], config, args.server_concurrency)
    finally:
        stop_group(proc, 60)


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the SFT checkpoint (Hugging Face folder): round 1's student")
    parser.add_argument("--tokenizer", help="folder with tokenizer.json, if not --model")
    parser.add_argument("--data", required=True, help="CMExam training questions (.csv, .json or .jsonl)")
    parser.add_argument("--out", required=True, help="output folder: round_1/, round_2/, ...")
    parser.add_argument("--limit", type=positive_int, help="only the first N questions")
    parser.add_argument("--rounds", type=nonnegative_int, default=0, help="sample+DPO rounds; 0 = round 1's pairs only")
    types = {int: positive_int, float: nonnegative_float}
    choices = {"correction": ("rewrite", "step"), "locate": ("critique", "confidence")}
    for field in dataclasses.fields(SelfPlayConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool:
            parser.add_argument(flag, action="store_true", help=f"SelfPlayConfig.{field.name}")
        else:
            kind = {"top_p": probability, "top_k": nonnegative_int, "seed": int}.get(field.name) \
                or types.get(type(field.default), type(field.default))
            parser.add_argument(flag, type=kind, default=field.default, choices=choices.get(field.name),
                                help=f"SelfPlayConfig.{field.name}")
    parser.add_argument("--round", type=positive_int, default=1, help="with --rounds 0: the round whose folder "
                        "(round_K) this run samples into or --merge joins (--model: round K-1's checkpoint)")
    parser.add_argument("--shard", type=nonnegative_int, default=0, help="this process's chunks: shard::num-shards")
    parser.add_argument("--num-shards", type=positive_int, default=1, help="sampling processes, each on its shard")
    parser.add_argument("--merge", action="store_true", help="join the --num-shards shard files of --round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="sampling device")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        help="sampling dtype")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs): sampling shards of our "
                        "sampler, then the DPO ranks (torchrun)")
    parser.add_argument("--base-url", help="sample from this OpenAI-compatible server (e.g. vLLM serving --model; "
                        "key, if any, from $OPENAI_API_KEY) instead of our sampler")
    parser.add_argument("--served-model", help="the model name the server serves (default: the first it lists)")
    parser.add_argument("--serve", help='start a server for each round\'s model, e.g. "vllm serve {model} --port '
                        '{port} --dtype bfloat16"; sample from it, stop it before DPO')
    parser.add_argument("--serve-port", type=nonnegative_int, default=0, help="{port} of --serve (0: a free one)")
    parser.add_argument("--serve-timeout", type=positive_float, default=900.0, help="seconds to wait for /v1/models")
    parser.add_argument("--server-concurrency", type=positive_int, default=64, help="requests in flight to the server")
    parser.add_argument("--dpo-script", default=str(Path(__file__).resolve().parent / "dpo.py"), help="dpo.py to run")
    parser.add_argument("--dpo-args", default="", help='more dpo.py flags in one string, e.g. "--beta 0.3"')
    args = parser.parse_args(argv)
    cfg = SelfPlayConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SelfPlayConfig)})
    if not set(cfg.sources.split(",")) <= {"correction", "sample"}:
        parser.error(f"--sources {cfg.sources!r}: comma-separated from correction, sample")
    if cfg.verify:
        try:
            load_check(cfg.verify)
        except (ValueError, OSError, AttributeError) as e:
            parser.error(f"--verify {cfg.verify!r}: {e}")
    if cfg.correction == "step" and (args.base_url or args.serve):
        parser.error("--correction step rewrites from a located token with the model's own log-probs: it needs our "
                     "sampler, not --base-url/--serve")
    if not 0 <= args.shard < args.num_shards or (args.num_shards > 1 and (args.rounds or args.nproc > 1)):
        parser.error("--shard i --num-shards n (0 <= i < n) only with --rounds 0 and --nproc 1; then --merge joins "
                     "the files")
    if args.base_url and args.serve:
        parser.error("--base-url (a running server) or --serve (start one per round), not both")
    if args.base_url and args.rounds > 1:
        parser.error("--base-url serves one model, but each round samples with the previous round's checkpoint: "
                     "use --serve, which starts a server for each round's model")

    out, model_path = Path(args.out), Path(args.model)
    # One writer per output: the whole folder, or with --num-shards this shard's files (and --merge round 1's).
    (out / f"round_{args.round}").mkdir(parents=True, exist_ok=True)
    if args.num_shards > 1 and not args.merge:
        lock_output(out / f"round_{args.round}" / f"samples{shard_suffix(args.shard, args.num_shards)}.jsonl")
    else:
        lock_output(out)
    rows = load_cmexam(args.data)[:args.limit]
    check_unique_ids(rows, args.data)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    if args.merge:
        merge_shards(out / f"round_{args.round}", rows, args.num_shards, model_path, args.round, cfg.chunk_size)
        return
    for k in range(1, args.rounds + 1) if args.rounds else [args.round]:
        round_dir = out / f"round_{k}"
        done = round_dir / "done.json"  # written once the round's DPO run has finished: names its checkpoint
        if args.rounds and done.exists():
            model_path = Path(json.loads(done.read_text())["checkpoint"])
            print(f"round {k}: done, its model is {model_path}")
            continue
        with serving(args, model_path) as server:
            if args.nproc > 1 and server is None:
                summary = sample_in_processes(args, cfg, rows, round_dir, model_path, k)
            else:
                summary = run_round(model_path, tokenizer, rows, round_dir, cfg, k, args.shard, args.num_shards,
                                    args.device, getattr(torch, args.dtype), server)
        if not args.rounds:
            break
        if not summary["pairs"]:
            raise UserError(f"round {k} made no pairs: nothing for DPO to train on")
        model_path = run_dpo(args, model_path, round_dir / "pairs.jsonl", round_dir / "dpo")
        done.write_text(json.dumps({"checkpoint": str(model_path), "pairs": summary["pairs"]}) + "\n")


if __name__ == "__main__":
    run_main(main)
