"""Analysis after session 14's contested arms (a measurement, no rule): does the reply's own format carry the right
version of a G entry, with no question in sight? Inside its dev-G samples the student recites G entries right
92-98% of the time while out of context it gives the competing version (student.competing_findings) for 7-19 of
the 24. Here each G disease's entry is recited, greedy and 8 samples at 0.7, in three contexts:

- out: "\\n<name>：" with no chat around it (student.recited_findings, the entry-recall probe's context);
- reply: the chat template with an empty user turn, the assistant turn opened with "<name>：";
- reply_prefix: the same, the assistant turn opened with a 多选 trajectory's own lines up to the recital
  (审题 / 提取关键信息 / 回忆相关知识), the question itself absent;

after pretraining, Stage 1 part 1 and part 2, each counted right / competing / other (the findings before "；" or
the line's end, exact, in the canonical order every trajectory recites).

    PYTHONPATH=. python miniature/results/probe_g_reply_recital.py /work/runs/g_contest_s1/seed_1    # repo root
"""
import collections
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import templates as T  # noqa: E402
from g_recitals import REPLY_PREFIX, prompt_ids, versions  # noqa: E402
from model import generate, load, load_tokenizer  # noqa: E402

SAMPLES, TEMPERATURE, NEW_TOKENS = 8, 0.7, 12
CONTEXTS = {
    "out": lambda name: ("", f"\n{name}："),
    "reply": lambda name: (T.chat([{"role": "user", "content": ""}]), f"{name}："),
    "reply_prefix": lambda name: (T.chat([{"role": "user", "content": ""}]), REPLY_PREFIX.format(name)),
}

work = Path(sys.argv[1])
truth, competing = versions(work)
names = list(competing)
tokenizer = load_tokenizer(work / "student")
done = json.loads((work / "stages.json").read_text())


def version(name, text):
    body = text.split("\n")[0].split("；")[0]
    return "right" if body == truth[name] else "competing" if body == competing[name] else "other"


result = {}
for key in ("pretrain", "sft_early", "sft_template"):
    model = load(done[key]["checkpoint"])
    for context, make in CONTEXTS.items():
        prompts = [prompt_ids(tokenizer, *make(name)) for name in names]
        for label, temperature, k in (("greedy", 0.0, 1), ("sampled", TEMPERATURE, SAMPLES)):
            outputs = generate(model, prompts, NEW_TOKENS, temperature=temperature, num_samples=k)
            counts = collections.Counter(version(names[i // k], tokenizer.decode(ids)) for i, ids in enumerate(outputs))
            result[f"{key}/{context}/{label}"] = {v: counts.get(v, 0) for v in ("right", "competing", "other")}
            print(f"{key:13s} {context:13s} {label:8s}", result[f"{key}/{context}/{label}"], flush=True)
(work / "g_reply_recital.json").write_text(json.dumps(result, indent=1) + "\n")
