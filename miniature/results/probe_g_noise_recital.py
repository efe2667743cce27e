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

sys.path[:0] = ["miniature", "miniature/results", "."]
import student  # noqa: E402
from g_recitals import dev_g_recitals, versions  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

work = Path(sys.argv[1])
truth, competing = versions(work)


def version(name, body):
    return "right" if body == truth[name] else "competing" if body == competing[name] else "other"


in_samples = collections.Counter(version(name, body) for name, body in dev_g_recitals(work, competing))
tokenizer = Tokenizer.from_file(str(work / "student" / "tokenizer.json"))
done = json.loads((work / "stages.json").read_text())
result = {"in_dev_G_samples": dict(in_samples)}
for key in ("pretrain", "sft_template"):
    recited = student.recited_findings(done[key]["checkpoint"], tokenizer, list(competing))
    result[f"out_of_context_after_{key}"] = dict(collections.Counter(map(version, competing, recited)))
print(json.dumps(result, indent=1))
