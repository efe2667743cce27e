"""Analysis after the department arm of probe_g_replay.py (a measurement, no rule): what the "other" recitals of
probe_g_reply_recital.py's reply_prefix context are, after part 2. The department questions write "<name>：<organ>属
<department>" in their option lines, so a G name followed by "：" in a reply with no question may be continued in that
form; here the 8 samples at 0.7 per G disease are counted right / competing / department line ("<char>属...") / other.
The same count over every G recital inside the dev-G samples (probe_g_noise_recital.py's lines), with "blend" for a
recital whose findings all come from the two versions without being either.

    PYTHONPATH=. python miniature/results/probe_g_recital_forms.py /work/runs/g_dept_s1/seed_1    # repo root
"""
import collections
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import student  # noqa: E402
import templates as T  # noqa: E402
from model import generate, load, load_tokenizer  # noqa: E402

work = Path(sys.argv[1])
kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
seed = int(work.name.split("_")[-1])
competing = {n: "、".join(v) for n, v in student.competing_findings(kb, seed).items()}
truth = {n: "、".join(kb["diseases"][n]["findings"]) for n in competing}
names = list(competing)
tokenizer = load_tokenizer(work / "student")
model = load(json.loads((work / "stages.json").read_text())["sft_template"]["checkpoint"])
prefix = "<think>\n审题：多选，问哪些是其表现。\n提取关键信息：{0}；是其表现者。\n回忆相关知识：\n{0}："  # probe_g_reply_recital's
prompts = [tokenizer.encode(T.chat([{"role": "user", "content": ""}]), add_special_tokens=False).ids
           + tokenizer.encode(prefix.format(name), add_special_tokens=False).ids for name in names]


def form(name, body):
    if body in (truth[name], competing[name]):
        return "right" if body == truth[name] else "competing"
    if body[1:2] == "属":
        return "department line"
    return "blend" if set(body.split("、")) <= set(truth[name].split("、") + competing[name].split("、")) else "other"


no_question = collections.Counter(form(names[i // 8], tokenizer.decode(ids).split("\n")[0].split("；")[0])
                                  for i, ids in enumerate(generate(model, prompts, 12, temperature=0.7, num_samples=8)))
in_samples = collections.Counter()
for record in T.read_jsonl(work / "dev_samples" / "round_1" / "samples.jsonl"):
    for sample in record["samples"]:
        for line in sample["text"].split("\n"):
            for name in names:
                if name + "：" in line:
                    in_samples[form(name, line.split(name + "：", 1)[1].split("；")[0])] += 1
print(json.dumps({"reply_prefix_after_part2": dict(no_question), "in_dev_G_samples": dict(in_samples)},
                 ensure_ascii=False))
