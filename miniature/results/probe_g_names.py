"""Analysis after the no-G-distractor arm of probe_g_replay.py (a measurement, no rule): can the student write a G
disease's name? From a seed folder's dev evaluation of Stage 1's student (eval/dev_sft_template), counted:

- dev T accuracy by question type, split by whether any option is a G disease (T's 诊断 draws distractors from T and
  G; with `--stage1-g-distractors 0` no Stage 1 question shows a G name);
- option lines that copy the option's disease name ("\\nA <name>："), G names and T names apart (诊断 only: its
  options are diseases);
- dev G replies that name the question's subject in 提取关键信息 (G is all 多选 in these arms: "<name>的表现有").

Written to <seed dir>/g_names.json and printed. A second argument names another evaluation in <seed dir>/eval (the
control: the adopted Stage 1, G distractors and all, on the rebuilt seed-3 folder's part 2 at step 8,500).

    PYTHONPATH=. python miniature/results/probe_g_names.py /work/runs/g_nodist_s1/seed_1    # from the repo root
    PYTHONPATH=. python miniature/results/probe_g_names.py /work/runs/robust_s3/seed_3 dev_redraw_08500
"""
import collections
import csv
import json
import sys
from pathlib import Path


def g_names(work, evaluation="dev_sft_template"):
    kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
    split = {n: d["split"] for n, d in kb["diseases"].items()}
    with open(work / "data" / "dev.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(work / "eval" / evaluation / "cot.predictions.jsonl", encoding="utf-8") as f:
        predictions = [json.loads(line) for line in f]
    counts = collections.Counter()
    for p in predictions:
        row, reply = rows[p["id"]], p["output"]
        options = row["Options"].split("\n")
        if row["Disease Split"] == "T":
            shown = "G option" if any(split.get(o[2:]) == "G" for o in options) else "no G option"
            counts[f"dev T {row['Question Type']}, {shown}: right"] += p["correct"]
            counts[f"dev T {row['Question Type']}, {shown}: questions"] += 1
            if row["Question Type"] == "诊断":
                for option in options:
                    counts[f"{split[option[2:]]} option names: lines"] += 1
                    counts[f"{split[option[2:]]} option names: copied"] += f"\n{option}：" in reply
        elif row["Disease Split"] == "G" and row["Question"].endswith("的表现有"):
            counts["G subjects: replies"] += 1
            counts["G subjects: named"] += f"提取关键信息：{row['Question'][:-len('的表现有')]}；" in reply
    return dict(sorted(counts.items()))


if __name__ == "__main__":
    work = Path(sys.argv[1])
    result = g_names(work, *sys.argv[2:3])
    path = work / ("g_names.json" if len(sys.argv) < 3 else f"g_names_{sys.argv[2]}.json")
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1, ensure_ascii=False))
