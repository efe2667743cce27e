"""Probe after run 6 (miniature/README.md; rule written before it ran): is the headroom gate's pass@4 half held back
by the sampler (temperature 0.7, top-p 0.9) or by the student's errors? Template SFT of each seed samples dev G again,
k = 4, at temperature 1.0 and top-p 1.0 (the unmodified distribution), beside the gate's own samples; both are broken
down by question type (诊断 diagnosis, 否定 "which is not", 多选 multiple answer).

Rule: if at 1.0 / 1.0 pass@4 >= pass@1 + 15 on every seed probed, the sampler is what holds the gate back, and the
next run's budget samples Stage 2 at 1.0 / 1.0 everywhere it samples (self-play, RFT, Iterative RPO, the gate), fixed
before its table; the gate's dev G bound (greedy, so untouched by sampling) must then be met by the exam. If not,
the gap is the student's systematic errors, sampling settings are not the fix, and the per-type rows say whether a
G mix weighted toward one type could pass (a type with pass@1 in [30, 75] and pass@4 >= pass@1 + 15).

    PYTHONPATH=. python miniature/results/probe_headroom_sampling.py /work/runs/run6/seed_1 /work/runs/run6/seed_2
"""
import collections
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402
import templates as T  # noqa: E402


def pass_at_k_by_type(work, name, rows):
    by_type = collections.defaultdict(list)
    for record in T.read_jsonl(work / name / "round_1" / "samples.jsonl"):
        if not record["skipped"]:
            rights = [s["right"] for s in record["samples"]]
            by_type["all"].append(rights)
            by_type[rows[record["id"]]["Question Type"]].append(rights)
    return {t: {"questions": len(v), "pass@1": round(100 * sum(map(sum, v)) / sum(map(len, v)), 1),
                "pass@4": round(100 * sum(map(any, v)) / len(v), 1)} for t, v in sorted(by_type.items())}


result = {}
for folder in sys.argv[1:]:
    work = Path(folder)
    seed = int(work.name.split("_")[-1])
    stage = R.Stages(work)
    hot = dataclasses.replace(R.Budget(), temperature=1.0, top_p=1.0)
    start = time.time()
    stage("probe_dev_samples_t1", lambda: R.selfplay(work, "dev_samples_t1", stage.done["sft_template"]["checkpoint"],
                                                     work / "data" / "dev_G.csv", hot, seed, "--sources", "sample",
                                                     samples=hot.pass_k) or {})
    rows = {r["id"]: r for r in T.load_cmexam(work / "data" / "dev_G.csv")}
    result[f"seed_{seed}"] = {"dev_G_greedy": round(100 * stage.done["dev_sft_template"]["G"], 1),
                              "t0.7_p0.9 (the gate's samples)": pass_at_k_by_type(work, "dev_samples", rows),
                              "t1.0_p1.0": pass_at_k_by_type(work, "dev_samples_t1", rows),
                              "seconds": round(time.time() - start, 1)}
print(json.dumps(result, indent=1, ensure_ascii=False))
