"""MedCritical end to end in miniature on 2 CPU cores: every stage through the real scripts, and the paper's table.

One seed: a synthetic exam (exam.py) and its knowledge text; a tiny Qwen2 student (student.py) pretrained on that
text by `sft.py --init-config`; Stage 1 data from the rule-based teacher (teacher.py, served on 127.0.0.1) through
the real `templates.py distill`; `sft.py`; Stage 2 as `selfplay.py` with `torchrun --nproc-per-node 2 dpo.py` for
two rounds; `eval_cmexam.py` on the held-out split after each stage. Beside it, the comparisons the claim rests on:
SFT on plain answers (no template), DPO on the teacher's corrections of the same wrong samples (costs teacher
calls), and template SFT continued for the compute Stage 2 spent (sampling and DPO, in forward-token units).

    python miniature/run.py --out runs/mini                  # one seed, the table
    python miniature/run.py --out runs/mini --seeds 0,1,2    # mean and spread over seeds
    python miniature/run.py --out runs/ci --quick            # every stage for a few steps (CI)

Every stage writes into <out>/seed_<s>/ and is skipped when its output exists, so a killed run resumes. All
budgets are in Budget below, fixed before any result was looked at, and the same for every row that shares them.
"""
import argparse
import csv
import dataclasses
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE, ROOT = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]
import exam  # noqa: E402
import teacher  # noqa: E402
from diagnose import diagnose  # noqa: E402
import templates as T  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Budgets. Sizes from measurements on 2 cores (miniature/README.md); none was tuned on test accuracy.


@dataclasses.dataclass
class Budget:
    diseases: int = 60
    train_questions: int = 2500  # the first stage1_questions for Stage 1, the next stage2_questions for Stage 2
    test_questions: int = 1000  # binomial SE ~1.5 points at mid-range accuracy
    stage1_questions: int = 2000  # the prototype's 2,000 trajectories
    critique_examples: int = 600  # teacher critiques of corrupted trajectories, so the student can critique at all
    stage2_questions: int = 500
    hidden: int = 128
    layers: int = 4
    pretrain_steps: int = 300  # loss at its floor (~0.27, the entropy of the shuffled line order) by ~250
    pretrain_lr: float = 3e-3
    sft_steps: int = 1500  # batch 8: 4.6 passes over 2,600 examples; 400 and 800 steps left the student at chance
    sft_lr: float = 3e-3
    batch: int = 8
    # Micro-batches change speed only (a step sums the same examples however they are split); the fastest measured
    # on 2 cores for each data: 256-token pretraining windows, ~330-token CoTs (grouped by length), ~115-token plain.
    pretrain_micro: int = 16
    cot_micro: int = 2
    plain_micro: int = 8
    samples: int = 2  # selfplay k: at ~25-50% accuracy most questions get a wrong sample to correct
    corrections: int = 1  # selfplay m (its default is 2): one critique per wrong sample, for the time budget
    temperature: float = 0.7  # selfplay's defaults
    top_p: float = 0.9
    sample_batch: int = 128  # prompts per generate call (x samples rows) and per committed chunk: 1.3x faster than 32
    max_new_tokens: int = 320  # teacher trajectories are <= ~235 tokens
    critique_max_new_tokens: int = 448  # critique + corrected trajectory <= ~330 tokens
    # Conservative for the size (the prototype: lr 1e-4 / beta 0.1 collapsed, 1e-5 / 0.5 moved nothing): lr 1/60 of
    # SFT's, the authors' beta, and Iterative RPO's NLL on the chosen reply against plain DPO pushing both down.
    dpo: str = "--beta 0.3 --rpo-alpha 1.0 --lr 5e-5 --epochs 2 --batch-size 8 --precompute-ref --truncate-rejected"
    eval_max_new_tokens: int = 320


QUICK = Budget(train_questions=160, test_questions=40, stage1_questions=100, critique_examples=20,
               stage2_questions=24, hidden=64, layers=2, pretrain_steps=20, sft_steps=30, samples=2, corrections=1,
               max_new_tokens=96, critique_max_new_tokens=128, eval_max_new_tokens=96,
               dpo="--beta 0.3 --rpo-alpha 1.0 --lr 5e-5 --epochs 1 --batch-size 2 --precompute-ref "
                   "--truncate-rejected")

# ----------------------------------------------------------------------------------------------------------------
# Plumbing: each stage runs once, its wall time recorded; commands are the ones a user types.


class Stages:
    def __init__(self, work):
        self.work, self.path = work, work / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.exists() else {}

    def __call__(self, name, fn):
        """Run fn() once; its result (JSON-able dict) and wall seconds are stored under `name`."""
        if name not in self.done:
            start = time.time()
            result = fn() or {}
            self.done[name] = {**result, "seconds": round(time.time() - start, 1)}
            self.path.write_text(json.dumps(self.done, indent=1, ensure_ascii=False) + "\n")
        return self.done[name]


def sh(*cmd, log=None, check=True):
    """A real command line, echoed. OMP_NUM_THREADS is left unset, on purpose: a single process then uses torch's
    default (every physical core) and torchrun gives each of its ranks 1 thread (its own default), so nothing is
    oversubscribed; selfplay.py's sampling uses both cores and its torchrun DPO child one thread per rank."""
    cmd = [str(c) for c in cmd]
    print("+ " + shlex.join(cmd), flush=True)
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    with open(log, "a") if log else open(os.devnull, "w") as f:
        result = subprocess.run(cmd, env=env, stdout=f if log else None, stderr=subprocess.STDOUT if log else None)
    if result.returncode and check:
        raise SystemExit(f"command failed ({result.returncode}): {shlex.join(cmd)}" + (f"; see {log}" if log else ""))
    return result.returncode


def last_checkpoint(folder):
    from sft import latest_checkpoints
    found = latest_checkpoints(folder)
    if not found:
        raise SystemExit(f"{folder}: no complete checkpoint")
    return found[-1]


def step_tokens(metrics):
    """Sum of the input tokens over the optimizer steps of a metrics.jsonl (sft.py and dpo.py write it)."""
    records = [json.loads(line) for line in Path(metrics).read_text().splitlines()]
    steps = [r for r in records if "tokens" in r and "step" in r and r.get("event") is None]
    return sum(r["tokens"] for r in steps), len(steps)


# ----------------------------------------------------------------------------------------------------------------
# The stages


def make_data(work, seed, b):
    data = work / "data"
    exam.build(exam.ExamConfig(seed=seed, diseases=b.diseases, train=b.train_questions, test=b.test_questions), data)
    with open(data / "train.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    exam.write_csv(rows[:b.stage1_questions], data / "stage1.csv")
    exam.write_csv(rows[b.stage1_questions:b.stage1_questions + b.stage2_questions], data / "stage2.csv")


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def sft(work, name, init, data, steps, lr, batch, micro, seed, max_len=1024, extra=()):
    """sft.py in one process on both cores: 1.4x the tokens/s of 2 FSDP ranks at this size (README), where gloo's
    per-block all-gathers and reduce-scatters cost about as much as the compute they split."""
    out = work / name
    sh(sys.executable, ROOT / "sft.py", *init, "--tokenizer", work / "student", "--data", data, "--out", out,
       "--max-len", max_len, "--steps", steps, "--lr", lr, "--batch-size", batch, "--micro-batch-size", micro,
       "--save-every", steps, "--seed", seed, "--resume", *extra, log=work / f"{name}.log")
    tokens, n = step_tokens(out / "metrics.jsonl")
    return {"checkpoint": str(last_checkpoint(out)), "train_tokens": tokens, "steps": n}


def distill(work, style, url, b):
    """Stage 1 data through the real `templates.py distill`. It appends answers as they arrive (4 in flight), so the
    file's order varies from run to run, and with it which examples sft.py's seeded shuffle puts together: sorted by
    question id here, a seed gives the same table every time."""
    out = work / f"stage1_{style}.jsonl"
    sh(sys.executable, ROOT / "templates.py", "distill", "--data", work / "data" / "stage1.csv", "--out", out,
       "--base-url", url, "--model", f"miniature-{style}", "--tries", 1, "--concurrency", 4, log=work / "distill.log")
    lines = out.read_text(encoding="utf-8").splitlines()
    out.write_text("".join(line + "\n" for line in sorted(lines, key=lambda line: json.loads(line)["id"])),
                   encoding="utf-8")
    return {"teacher_calls": b.stage1_questions}


def critique_data(work, kb, url, b, seed):
    """Stage 1's critique examples: the teacher corrupts one or two steps of a right trajectory (the student's kind
    of error) and, asked with the real critique prompt, names the wrong steps and re-emits the fixed trajectory."""
    rows, rng = T.load_cmexam(work / "data" / "stage1.csv")[:b.critique_examples], random.Random(f"critique-{seed}")
    cfg = T.TeacherConfig(base_url=url, model="miniature-template", max_retries=2)
    with open(work / "stage1_critiques.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            wrong, kinds = teacher.corrupt(kb, teacher.parse_question(T.format_question(row)), rng)
            messages = T.critique_messages(row, wrong)
            reply = T.chat_completion(cfg, messages)
            f.write(json.dumps({"messages": messages + [{"role": "assistant", "content": reply}], "id": row["id"],
                                "errors": kinds}, ensure_ascii=False) + "\n")
    return {"teacher_calls": len(rows)}


def teacher_pairs(work, url):
    """The costly baseline: round 1's wrong samples (their texts, from selfplay's samples.jsonl), corrected by the
    teacher instead of the student. Same selection (finished and wrong), same pair format, same DPO."""
    import selfplay as S
    rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "stage2.csv")}
    records = map(json.loads, (work / "selfplay" / "round_1" / "samples.jsonl").read_text("utf-8").splitlines())
    client = T.TeacherConfig(base_url=url, model="miniature-template", max_retries=2)
    pairs, calls, right, seen = [], 0, 0, set()
    for record in records:
        row = rows[record["id"]]
        for s, sample in enumerate(record["samples"]):
            if not sample["finished"] or sample["right"]:
                continue
            calls += 1
            solution = T.extract_correction(T.chat_completion(client, T.critique_messages(row, sample["text"])))
            if T.extract_answer(solution) == row["answer"] and T.is_well_formed(solution):
                right += 1
                pair = S.make_pair(row, solution, sample["text"], round=1, sample=s, source="teacher", hint=False,
                                   answer=row["answer"], rejected_answer=sample["predicted"])
                if S.pair_key(pair) not in seen:
                    seen.add(S.pair_key(pair))
                    pairs.append(pair)
    S.write_jsonl(work / "teacher_pairs.jsonl", pairs)
    return {"teacher_calls": calls, "pairs": len(pairs), "correction_success_rate": right / max(calls, 1)}


def dpo(work, name, model, pairs, b, seed):
    out = work / name
    sh(*TORCHRUN, ROOT / "dpo.py", "--model", model, "--tokenizer", work / "student", "--data", pairs, "--out", out,
       "--seed", seed, "--save-every", 100000, "--resume", *shlex.split(b.dpo), log=work / f"{name}.log")
    tokens, n = step_tokens(out / "metrics.jsonl")
    return {"checkpoint": str(last_checkpoint(out)), "train_tokens": tokens, "steps": n}


COUNTS = ("accuracy_per_sample", "samples", "correction_attempts", "wrong_samples_sent_to_critique")


def selfplay_round(work, k, model, b, seed):
    """selfplay.py's own round loop (--rounds k resumes rounds 1..k-1 from their done.json)."""
    dpo_args = f"--seed {seed} --save-every 100000 {b.dpo}"
    sh(sys.executable, ROOT / "selfplay.py", "--model", model, "--tokenizer", work / "student", "--data",
       work / "data" / "stage2.csv", "--out", work / "selfplay", "--rounds", k, "--samples", b.samples,
       "--corrections", b.corrections, "--temperature", b.temperature, "--top-p", b.top_p, "--max-new-tokens",
       b.max_new_tokens, "--critique-max-new-tokens", b.critique_max_new_tokens, "--seed", seed, "--nproc", 2,
       "--batch-size", b.sample_batch, "--chunk-size", b.sample_batch,
       "--dpo-args", dpo_args, log=work / f"selfplay_round{k}.log", check=False)
    round_dir, log = work / "selfplay" / f"round_{k}", work / f"selfplay_round{k}.log"
    if not (round_dir / "summary.json").exists():
        raise SystemExit(f"selfplay round {k} failed; see {log}")
    summary = json.loads((round_dir / "summary.json").read_text())
    result = {"pairs": summary["pairs"], "sampled_tokens": summary["generated_tokens"],
              "correction_success_rate": summary["correction_success_rate"],
              "teacher_calls": summary["teacher_calls"], **{key: summary[key] for key in COUNTS}}
    if (round_dir / "done.json").exists():
        tokens, n = step_tokens(round_dir / "dpo" / "metrics.jsonl")
        return {**result, "checkpoint": json.loads((round_dir / "done.json").read_text())["checkpoint"],
                "train_tokens": tokens, "steps": n}
    if summary["pairs"]:
        raise SystemExit(f"selfplay round {k} made pairs but its DPO failed; see {log}")
    # No pair (a student too weak to correct itself, as in --quick): nothing for DPO, the model stays as it was.
    print(f"round {k}: no pairs, DPO skipped", flush=True)
    return {**result, "checkpoint": str(model), "train_tokens": 0, "steps": 0}


def why_corrections_fail(work, k):
    """diagnose.py's step-by-step grading of round k's corrections, the numbers the README discusses."""
    n, _, _ = diagnose(work, k)
    share = lambda a, b: n[a] / n[b] if n[b] else None  # noqa: E731
    return {"right_corrections_all_steps_right": share("corrections right with every step right",
                                                       "corrections right"),
            "right_samples_all_steps_right": share("right samples with every step right", "right samples"),
            "critique_lines_naming_a_wrong_step": share("critique lines naming a truly wrong step", "critique lines"),
            "right_lines_broken_by_correction": share("right step lines broken", "right step lines"),
            "wrong_lines_fixed_by_correction": share("wrong step lines fixed", "wrong step lines (in corrected samples)"),
            "corrections_same_answer_as_wrong": share("corrections: same answer as the wrong sample", "corrections"),
            "corrections_right": share("corrections right", "corrections"),
            "fresh_sample_right_after_a_wrong_one": share("wrong samples: another sample right", "wrong samples")}


def evaluate(work, name, model, b):
    out = work / "eval" / name
    sh(sys.executable, ROOT / "eval_cmexam.py", "--model", model, "--tokenizer", work / "student", "--data",
       work / "data" / "test.csv", "--out", out, "--max-new-tokens", b.eval_max_new_tokens, "--batch-size", 250,
       log=work / "eval.log")
    report = json.loads((out / "cot.report.json").read_text())
    predictions = [json.loads(line) for line in (out / "cot.predictions.jsonl").read_text().splitlines()]
    rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "test.csv")}
    groups = {}  # our own columns, which eval_cmexam.py's report (CMExam's five) leaves out
    for p in predictions:
        for column in ("Seen In Training", "Question Type"):
            groups.setdefault(f"{column}={rows[p['id']][column]}", []).append(bool(p["correct"]))
    share = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return {"accuracy": report["overall"]["accuracy"], "ci95": report["overall"]["ci95"],
            "consistency": teacher.consistency(p["output"] for p in predictions),
            "seen": share.get("Seen In Training=是"), "unseen": share.get("Seen In Training=否"), "groups": share}


def compute_matched_steps(work, stages, b):
    """SFT steps costing what both Stage 2 rounds cost, in forward-token units: a trained token costs 3 (forward and
    backward), a prefilled, sampled or reference-scored token 1. A student prompt is prefilled once for its k
    samples; a critique prompt holds the student prompt, the wrong sample (about a mean sample) and ~60 tokens of
    instructions. DPO's reference log-probs are computed once (--precompute-ref): one forward over one epoch."""
    from model import load_tokenizer
    tokenizer = load_tokenizer(work / "student")
    rows = T.load_cmexam(work / "data" / "stage2.csv")
    prompt = statistics.mean(len(tokenizer.encode(T.chat(T.student_messages(r))).ids) for r in rows)
    epochs = float(b.dpo.split("--epochs")[1].split()[0]) if "--epochs" in b.dpo else 1.0
    units = 0
    for k in (1, 2):
        r = stages[f"selfplay_{k}"]
        mean_sample = r["sampled_tokens"] / max(1, r["samples"] + r["correction_attempts"])
        units += r["sampled_tokens"] + prompt * len(rows) + r["wrong_samples_sent_to_critique"] * (prompt + mean_sample + 60)
        units += 3 * r["train_tokens"] + r["train_tokens"] / epochs
    per_step = 3 * stages["sft_template"]["train_tokens"] / stages["sft_template"]["steps"]
    return max(1, round(units / per_step))


def run_seed(out, seed, b):
    work = out / f"seed_{seed}"
    work.mkdir(parents=True, exist_ok=True)
    stage = Stages(work)
    stage("data", lambda: make_data(work, seed, b))
    kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
    stage("student", lambda: sh(sys.executable, HERE / "student.py", "--data", work / "data", "--out",
                                work / "student", "--hidden", b.hidden, "--layers", b.layers, "--seed", seed))
    pre = stage("pretrain", lambda: sft(work, "pretrain", ["--init-config", work / "student" / "config.json"],
                                        work / "student" / "pretrain.jsonl", b.pretrain_steps, b.pretrain_lr, 16,
                                        b.pretrain_micro, seed, max_len=256,
                                        extra=["--weight-decay", 0.1]))["checkpoint"]
    server, url, _ = teacher.serve(kb)
    try:
        for style in ("template", "plain"):
            stage(f"distill_{style}", lambda: distill(work, style, url, b))
        stage("critiques", lambda: critique_data(work, kb, url, b, seed))
        data = work / "stage1_template_and_critiques.jsonl"
        data.write_text((work / "stage1_template.jsonl").read_text() + (work / "stage1_critiques.jsonl").read_text())
        t = stage("sft_template", lambda: sft(work, "sft_template", ["--model", pre], data, b.sft_steps, b.sft_lr,
                                                b.batch, b.cot_micro, seed))["checkpoint"]
        stage("sft_plain", lambda: sft(work, "sft_plain", ["--model", pre], work / "stage1_plain.jsonl",
                                       b.sft_steps, b.sft_lr, b.batch, b.plain_micro, seed))
        r1 = stage("selfplay_1", lambda: selfplay_round(work, 1, t, b, seed))
        stage("why_1", lambda: why_corrections_fail(work, 1))
        stage("selfplay_2", lambda: selfplay_round(work, 2, t, b, seed) if r1["pairs"] else {**r1, "seconds": 0})
        stage("teacher_pairs", lambda: teacher_pairs(work, url))
    finally:
        server.shutdown()
    pairs = stage.done["teacher_pairs"]["pairs"]
    stage("dpo_teacher", lambda: dpo(work, "dpo_teacher", t, work / "teacher_pairs.jsonl", b, seed) if pairs
          else {"checkpoint": t})
    extra = compute_matched_steps(work, stage.done, b)
    stage("sft_matched", lambda: sft(work, "sft_matched", ["--model", t], data, extra, b.sft_lr, b.batch,
                                     b.cot_micro, seed))
    rows = [("pretrained", "pretrain"), ("plain SFT", "sft_plain"), ("template SFT", "sft_template"),
            ("template SFT + matched compute", "sft_matched"), ("self-correction DPO, round 1", "selfplay_1"),
            ("self-correction DPO, round 2", "selfplay_2"), ("teacher-corrected DPO", "dpo_teacher")]
    table = []
    for label, key in rows:
        ev = stage(f"eval_{key}", lambda: evaluate(work, key, stage.done[key]["checkpoint"], b))
        info = dict(stage.done[key])
        if key == "dpo_teacher":  # its cost: the teacher's corrections and the DPO run (the samples are round 1's)
            info.update({k: stage.done["teacher_pairs"][k] for k in ("pairs", "correction_success_rate",
                                                                     "teacher_calls")})
            info["seconds"] += stage.done["teacher_pairs"]["seconds"]
        table.append({"row": label, **ev, **{k: info.get(k) for k in (
            "pairs", "correction_success_rate", "teacher_calls", "seconds")}})
    (work / "table.json").write_text(json.dumps(table, indent=1, ensure_ascii=False) + "\n")
    return table, stage.done


# ----------------------------------------------------------------------------------------------------------------
# The table


def fmt(x, pct=True):
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.0f}"


def print_table(tables, stage1_calls):
    print(f"\nHeld-out accuracy (%, greedy chain of thought, exact match of the letter set), {len(tables)} seed(s). "
          f"Stage 1 cost {stage1_calls} teacher calls (trajectories + critique examples) for every template row; "
          "'teacher' counts Stage 2's. 'vs template' is each seed's difference from its own template SFT row "
          "(seeds differ more in where SFT lands than in what a later stage adds).")
    head = f"{'row':32} {'accuracy':>14} {'vs template':>12} {'seen':>6} {'unseen':>7} {'consist.':>9} " \
           f"{'pairs':>6} {'corr.ok':>8} {'teacher':>8} {'seconds':>8}"
    print(head + "\n" + "-" * len(head))
    template = [c["accuracy"] for c in next(t for t in zip(*tables) if t[0]["row"] == "template SFT")]
    spread = lambda xs: f" ±{100 * statistics.stdev(xs):.1f}" if len(xs) > 1 else ""  # noqa: E731
    for i, first in enumerate(tables[0]):
        cells = [t[i] for t in tables]
        acc = [c["accuracy"] for c in cells]
        gain = [a - t for a, t in zip(acc, template)]
        mean = lambda key: statistics.mean(c[key] for c in cells) if all(c.get(key) is not None for c in cells) \
            else None  # noqa: E731
        print(f"{first['row']:32} {fmt(mean('accuracy')) + spread(acc):>14} "
              f"{f'{100 * statistics.mean(gain):+.1f}' + spread(gain):>12} {fmt(mean('seen')):>6} "
              f"{fmt(mean('unseen')):>7} {fmt(mean('consistency')):>9} {fmt(mean('pairs'), False):>6} "
              f"{fmt(mean('correction_success_rate')):>8} {fmt(mean('teacher_calls'), False):>8} "
              f"{fmt(mean('seconds'), False):>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="run folder (resumable: rerun the same command)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the plumbing only")
    args = parser.parse_args(argv)
    b = QUICK if args.quick else Budget()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps(dataclasses.asdict(b), indent=1) + "\n")
    start, tables, whys, seconds = time.time(), [], [], []
    for seed in [int(s) for s in args.seeds.split(",")]:
        table, stages = run_seed(out, seed, b)
        tables.append(table)
        whys.append(stages["why_1"])
        seconds.append(sum(stage["seconds"] for stage in stages.values()))
        calls = stages["distill_template"]["teacher_calls"] + stages["critiques"]["teacher_calls"]
    print_table(tables, calls)
    print("\nRound 1's corrections graded step by step against the teacher's trajectory (miniature/diagnose.py), "
          "% (mean over seeds):")
    for key in [key for key in whys[0] if key != "seconds"]:
        values = [w[key] for w in whys if w[key] is not None]
        print(f"  {key.replace('_', ' '):40} {fmt(statistics.mean(values)) if values else '-':>6}")
    print(f"\nwall time {time.time() - start:.0f} s (stages of each seed: {', '.join(f'{s:.0f}' for s in seconds)} "
          f"s); per-seed details in {out}/seed_*/stages.json and table.json")


if __name__ == "__main__":
    main()
