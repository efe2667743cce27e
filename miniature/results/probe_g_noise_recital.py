"""Analysis after the noise arm of probe_g_replay.py (a measurement, no rule): which version of each G entry the
student recites, out of context (greedy from "<name>：", after pretraining and after template SFT) and inside its
own dev-G samples (every line that recites a G disease's entry after its name), right, the competing version
(student.competing_findings) or other.

    PYTHONPATH=. python miniature/results/probe_g_noise_recital.py /work/runs/g_noise05/seed_1    # from the repo root
"""
import collections
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import student  # noqa: E402
import templates as T  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

work = Path(sys.argv[1])
kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
seed = int(work.name.split("_")[-1])
competing = {n: "、".join(v) for n, v in student.competing_findings(kb, seed).items()}
truth = {n: "、".join(kb["diseases"][n]["findings"]) for n in competing}


def version(name, body):
    return "right" if body == truth[name] else "competing" if body == competing[name] else "other"


in_samples = collections.Counter()
for record in T.read_jsonl(work / "dev_samples" / "round_1" / "samples.jsonl"):
    for s in record["samples"]:
        for line in s["text"].split("\n"):
            for name in competing:
                if name + "：" in line:
                    in_samples[version(name, line.split(name + "：", 1)[1].split("；")[0])] += 1
tokenizer = Tokenizer.from_file(str(work / "student" / "tokenizer.json"))
done = json.loads((work / "stages.json").read_text())
result = {"in_dev_G_samples": dict(in_samples)}
for key in ("pretrain", "sft_template"):
    recited = student.recited_findings(done[key]["checkpoint"], tokenizer, list(competing))
    result[f"out_of_context_after_{key}"] = dict(collections.Counter(map(version, competing, recited)))
print(json.dumps(result, indent=1))
