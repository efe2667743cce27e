"""Probe after the all-多选 probe (miniature/README.md; rule written before it ran): can held-out reading questions
measure the skill G needs, so that Stage 1 can be run until that skill converges?

Stage 1's convergence gate measures T, and T converges before G does: part 2 run twice as long lifted dev G 9.3 ->
28.0 (seed 0, all-多选 G) and 54.3 -> 77.3 (run 6's seed 1) with dev T within 2 points of where it was. A gate on
the skill itself needs questions no memory can answer that Stage 1 never trained on: reading questions
(exam.reading_question: fresh diseases, their entries stated in the stem) drawn afresh, exam.ExamConfig.dev_reading.
This rebuilds each exam with 600 of them (checking that every other CSV comes out byte for byte as the run's own),
evaluates every Stage 1 checkpoint the runs left on them, and sets dev R beside dev G. G is counted on its 多选
questions only, the one type both runs' dev G has (run 6's is mixed, the probe's all-多选).

Rule: dev R becomes the measure of Stage 1's convergence in the next budget if, over these checkpoints, its rank
correlation (Spearman) with dev G's 多选 accuracy is at least 0.8 AND it is under 95 on every checkpoint whose G
多选 accuracy is under 30 (it must show the skill unfinished where G is low). Otherwise it does not measure what G
needs, and the next Stage 1 change has to aim at using G's knowledge (seed 0's failure), not at reading.

    PYTHONPATH=. python miniature/results/probe_dev_reading.py /work/runs     # from the repo root
"""
import json
import statistics
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402
import templates as T  # noqa: E402

CHECKPOINTS = {"probe_g_multi/seed_0": ["sft_template", "sft_long", "sft_template_order1000"],
               "probe_g_multi/seed_1": ["sft_template", "sft_long"], "probe_g_multi/seed_2": ["sft_template"],
               "run6/seed_1": ["sft_template", "sft_long"], "run6/seed_2": ["sft_template"]}


def g_multi(work, key):
    """Dev G's 多选 accuracy of checkpoint `key`, from its dev predictions."""
    rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "dev.csv")}
    right = [p["correct"] for p in T.read_jsonl(work / "eval" / f"dev_{key}" / "cot.predictions.jsonl")
             if rows[p["id"]]["Disease Split"] == "G" and rows[p["id"]]["Question Type"] == "多选"]
    return sum(right) / len(right)


def ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(xs, ys):
    return statistics.correlation(ranks(xs), ranks(ys))


rows = []
for folder, keys in CHECKPOINTS.items():
    work = Path(sys.argv[1]) / folder
    b = R.Budget(**json.loads((work.parent / "budget.json").read_text())) if (work.parent / "budget.json").exists() \
        else R.Budget()
    R.ensure_dev_reading(work, 600)
    stage = R.Stages(work)
    for key in keys:
        ev = stage(f"dev_R_{key}", lambda: R.evaluate(work, key, stage.done[key]["checkpoint"], b, "dev_R"))
        rows.append({"run": folder, "checkpoint": key, "dev_R": ev["groups"]["Disease Split=R"],
                     "dev_R_by_type": {k: v for k, v in ev["groups"].items() if k.startswith("Question Type")},
                     "dev_G_multi": g_multi(work, key), "dev_G": stage.done[f"dev_{key}"]["G"],
                     "dev_T": stage.done[f"dev_{key}"]["T"]})
        print(f"{folder:22s} {key:24s} dev R {100 * rows[-1]['dev_R']:5.1f}  dev G 多选 "
              f"{100 * rows[-1]['dev_G_multi']:5.1f}  dev G {100 * rows[-1]['dev_G']:5.1f}  dev T "
              f"{100 * rows[-1]['dev_T']:5.1f}", flush=True)
rho = spearman([r["dev_R"] for r in rows], [r["dev_G_multi"] for r in rows])
low = [r for r in rows if r["dev_G_multi"] < 0.30]
adopted = rho >= 0.8 and all(r["dev_R"] < 0.95 for r in low)
print(json.dumps({"checkpoints": rows, "spearman_R_vs_G_multi": rho, "G_multi_under_30": len(low),
                  "rule": "adopted" if adopted else "not adopted"}, indent=1, ensure_ascii=False))
