"""How a contested arm's student marks the contested findings (probe_g_replay.py --contested; README: session 14):
over its dev-G samples, the option lines for each G subject's dropped finding (right: 对) and the competing
version's added one (right: 错), template SFT's dev accuracy by split and question type, and how many Stage 1
options (each recited, entry and all, by its teacher trajectory) are G diseases.

    PYTHONPATH=. python miniature/results/probe_g_contested_checks.py /work/runs/g_contest_s1/seed_1
"""
import collections
import json
import sys
from pathlib import Path

sys.path[:0] = ["."]
import templates as T  # noqa: E402

work = Path(sys.argv[1])
contested = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))["contested"]
marks, option_line = collections.Counter(), tuple(f"{letter} " for letter in "ABCDE")
for record in T.read_jsonl(work / "dev_samples" / "round_1" / "samples.jsonl"):
    for sample in record["samples"]:
        name = next((n for n in contested if n in sample["text"]), None)
        if name is None:
            continue
        for line in sample["text"].split("\n"):
            if line.startswith(option_line) and line[2:3] in contested[name]:
                which = "dropped" if line[2:3] == contested[name][0] else "added"
                marks[f"{which} {line[-1] if line[-1] in '对错' else '?'}"] += 1
rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "dev.csv")}
right, seen = collections.Counter(), collections.Counter()
for p in T.read_jsonl(work / "eval" / "dev_sft_template" / "cot.predictions.jsonl"):
    key = f"{rows[p['id']]['Disease Split']} {rows[p['id']]['Question Type']}"
    seen[key] += 1
    right[key] += bool(p["correct"])
g_options = sum(o in contested for row in T.load_cmexam(work / "data" / "stage1.csv") for o in row["options"].values())
print(json.dumps({"marks_in_dev_G_samples": dict(sorted(marks.items())), "stage1_G_options": g_options,
                  "dev_right_of": {k: [right[k], seen[k]] for k in sorted(seen)}}, indent=1, ensure_ascii=False))
