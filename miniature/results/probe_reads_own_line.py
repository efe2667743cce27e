"""Probe after run 4: does template SFT check an option against the entry it just recited, or against memory?
On dev 诊断 questions (T and G), the teacher's trajectory is fed to the student up to an option line's recited entry,
with that entry edited so that it now contains a given finding its real entry lacks; the student then writes the
line's checks, greedy. A student that reads its own line writes "<finding>有"; one that answers from memory writes
"<finding>无". The same prefix with the entry unedited is the control (it should write 无).

    PYTHONPATH=. python miniature/results/probe_reads_own_line.py /work/runs/run4/seed_0     # from the repo root
    (a second argument names another stage's checkpoint than sft_template, e.g. sft_long)
"""
import json
import random
import sys
from collections import Counter

sys.path[:0] = ["miniature", "."]
import teacher  # noqa: E402
import templates as T  # noqa: E402
from model import generate, load, load_tokenizer  # noqa: E402

work = sys.argv[1].rstrip("/") + "/"
stages = json.load(open(work + "stages.json"))
key = sys.argv[2] if len(sys.argv) > 2 else "sft_template"
model, tokenizer = load(stages[key]["checkpoint"]), load_tokenizer(work + "student")
kb = json.load(open(work + "data/kb.json", encoding="utf-8"))
rng = random.Random(0)
cases = []  # (split, edited?, finding, prompt ids)
for row in T.load_cmexam(work + "data/dev.csv"):
    q = teacher.parse_question(T.format_question(row))
    if q["kind"] != "诊断":
        continue
    text = teacher.answer_text(kb, q)
    for line in text.split("\n"):
        if line[:1] in "ABCDE" and line[1:2] == " " and line.endswith("，错"):
            entry_part = line.split("；")[0]
            name, entry = entry_part[2:].split("：")
            entry = entry.split("、")
            lacking = [f for f in q["given"] if f not in entry]
            others = [i for i, f in enumerate(entry) if f not in q["given"]]
            if not lacking or not others:
                continue
            finding = rng.choice(lacking)
            edited = list(entry)
            edited[rng.choice(others)] = finding
            head = text[:text.index(line)]
            prompt = T.chat(T.student_messages(row), True)
            for is_edited, e in ((False, entry), (True, edited)):
                prefix = prompt + head + f"{line[:2]}{name}：{'、'.join(e)}；"
                cases.append((row["Disease Split"], is_edited, finding,
                              tokenizer.encode(prefix, add_special_tokens=False).ids))
            break  # one line per question
outputs = generate(model, [c[3] for c in cases], 16)
counts = Counter()
for (split, is_edited, finding, _), ids in zip(cases, outputs):
    checks = tokenizer.decode(ids).split("，")[0]
    said = "有" if f"{finding}有" in checks else "无" if f"{finding}无" in checks else "neither"
    counts[(split, "edited" if is_edited else "control", said)] += 1
result = {f"{s} {kind}": {said: counts[(s, kind, said)] for said in ("有", "无", "neither")}
          for s in "TG" for kind in ("control", "edited")}
print(json.dumps(result, ensure_ascii=False, indent=1))
