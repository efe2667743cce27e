"""Analysis after probe_stage1_continue.py (a measurement, no rule): where a stalled Stage 1 goes wrong on dev R.
For each wrong dev-R reply of a seed's template SFT: the first line that differs from the teacher's own trajectory
(teacher.first_wrong_line), labelled by its section (审题 ... 得出结论), and for an option line whether the entry
it copies or its 有/无 mark is what is wrong; and whether the reply's answer follows its own marks.

    PYTHONPATH=. python miniature/results/probe_dev_r_errors.py /work/runs/robust_s4/seed_4    # from the repo root
"""
import collections
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import teacher  # noqa: E402
import templates as T  # noqa: E402

work = Path(sys.argv[1])
kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "dev_R.csv")}
predictions = T.read_jsonl(work / "eval" / "dev_R_sft_template" / "cot.predictions.jsonl")
where, kinds = collections.Counter(), collections.Counter()
for p in predictions:
    if p["correct"]:
        continue
    row = rows[p["id"]]
    q = teacher.parse_question(T.format_question(row))
    beliefs = teacher.beliefs_for(kb, q)  # the stem's entries: a reading question's diseases are not in kb
    reference = teacher.answer_text(beliefs, q).split("\n")
    k = teacher.first_wrong_line(beliefs, q, p["output"])
    theirs = p["output"].split("\n")
    section = next((line.rstrip("：") for line in reversed(reference[:k - 1]) if line.endswith("：")), "审题") \
        if k else "none"
    label = section
    if section == "逐项分析各选项" and k <= len(reference) and k <= len(theirs):
        label += (": entry copied wrong" if reference[k - 1].split("；")[0] != theirs[k - 1].split("；")[0]
                  else ": 有/无 or 对/错 mark")
    where[label] += 1
    kinds[row["Question Type"]] += 1
    kinds["follows its own marks"] += teacher.follows_marks(p["output"])
result = {"wrong": sum(1 for p in predictions if not p["correct"]), "of": len(predictions),
          "first wrong line": dict(where.most_common()), "by type and marks": dict(kinds)}
print(json.dumps(result, ensure_ascii=False, indent=1))
(work / "dev_r_errors.json").write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n")
