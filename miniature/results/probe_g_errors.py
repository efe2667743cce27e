"""Analysis after run 4: where template SFT's wrong samples on dev G first go wrong (the --gates run's dev_samples,
k = 4 at the budget's temperature), graded against the teacher's trajectory for the same question, and how often a
question's four wrong samples share one first wrong line (why pass@4 stays near pass@1).

    PYTHONPATH=. python miniature/results/probe_g_errors.py /work/runs/run4/seed_0     # from the repo root
"""
import collections
import json
import sys

sys.path[:0] = ["miniature", "."]
import teacher  # noqa: E402
import templates as T  # noqa: E402

work = sys.argv[1].rstrip("/") + "/"
kb = json.load(open(work + "data/kb.json", encoding="utf-8"))
rows = {r["id"]: r for r in T.load_cmexam(work + "data/dev_G.csv")}
kinds, by_type, all_wrong, same_line = collections.Counter(), collections.defaultdict(list), 0, 0
for record in T.read_jsonl(work + "dev_samples/round_1/samples.jsonl"):
    row = rows[record["id"]]
    q = teacher.parse_question(T.format_question(row))
    reference = teacher.answer_text(kb, q).split("\n")
    by_type[row["Question Type"]].append([s["right"] for s in record["samples"]])
    firsts = []
    for s in record["samples"]:
        if s["right"]:
            continue
        lines, n = s["text"].split("\n"), teacher.first_wrong_line(kb, q, s["text"])
        line = lines[n - 1] if isinstance(n, int) and 0 < n <= len(lines) else None
        firsts.append(line)
        ref = [r for r in reference if line and r[:2] == line[:2]]
        if line is None:
            kind = "no step line"
        elif line.startswith("提取"):
            kind = "findings line (copied from the question)"
        elif line[:1] in "ABCDE" and line[1:2] == " " and ref and "；" in line and "；" in ref[0]:
            (entry, checks), (ref_entry, ref_checks) = line.split("；", 1), ref[0].split("；", 1)
            kind = ("option name miscopied" if entry.split("：")[0] != ref_entry.split("：")[0] else
                    "recited entry wrong" if entry != ref_entry else "entry right, check or mark wrong")
        else:
            kind = "other line"
        kinds[f"{row['Question Type']}: {kind}"] += 1
    if len(firsts) == len(record["samples"]):
        all_wrong += 1
        same_line += len(set(firsts)) == 1
result = {"first_wrong_line": dict(kinds.most_common()),
          "questions_all_samples_wrong": all_wrong, "of_which_same_first_wrong_line": same_line,
          "by_type": {t: {"questions": len(v), "pass@1": sum(map(sum, v)) / sum(map(len, v)),
                          "pass@k": sum(map(any, v)) / len(v)} for t, v in sorted(by_type.items())}}
print(json.dumps(result, indent=1, ensure_ascii=False))
