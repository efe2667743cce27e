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
import templates as T  # noqa: E402
from g_recitals import REPLY_PREFIX, dev_g_recitals, prompt_ids, versions  # noqa: E402
from model import generate, load, load_tokenizer  # noqa: E402

work = Path(sys.argv[1])
truth, competing = versions(work)
names = list(competing)
tokenizer = load_tokenizer(work / "student")
model = load(json.loads((work / "stages.json").read_text())["sft_template"]["checkpoint"])
reply_turn = T.chat([{"role": "user", "content": ""}])
prompts = [prompt_ids(tokenizer, reply_turn, REPLY_PREFIX.format(name)) for name in names]


def form(name, body):
    if body in (truth[name], competing[name]):
        return "right" if body == truth[name] else "competing"
    if body[1:2] == "属":
        return "department line"
    return "blend" if set(body.split("、")) <= set(truth[name].split("、") + competing[name].split("、")) else "other"


no_question = collections.Counter(form(names[i // 8], tokenizer.decode(ids).split("\n")[0].split("；")[0])
                                  for i, ids in enumerate(generate(model, prompts, 12, temperature=0.7, num_samples=8)))
in_samples = collections.Counter(form(name, body) for name, body in dev_g_recitals(work, names))
print(json.dumps({"reply_prefix_after_part2": dict(no_question), "in_dev_G_samples": dict(in_samples)},
                 ensure_ascii=False))
