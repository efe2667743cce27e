"""Probe after run 4 (miniature/README.md; rule written before it ran): does a longer Stage 1 open the G headroom?
The --gates run's 4,000-step part 2 (`sft_long`) samples dev G at the budget's temperature, k = 4, as the headroom
gate samples template SFT. Rule: if its dev G is in [30, 75] and pass@4 >= pass@1 + 15, the next run's Stage 1 is
part 2 at 4,000 steps (Budget.sft_steps 4,500); if not, a longer Stage 1 alone does not pass the gate.

    PYTHONPATH=. python miniature/results/probe_long_passk.py /work/runs/run4/seed_0     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, "miniature")
import run as R  # noqa: E402

work = Path(sys.argv[1])
b = R.Budget()
stage = R.Stages(work)
long = stage.done["sft_long"]["checkpoint"]
stage("probe_dev_samples_long", lambda: R.selfplay(work, "dev_samples_long", long, work / "data" / "dev_G.csv", b, 0,
                                                   "--sources", "sample", samples=b.pass_k) or {})
pass1, passk = R.pass_at_k(work, "dev_samples_long")
print(json.dumps({"dev_G_greedy": stage.done["dev_sft_long"]["G"], "pass@1": pass1, f"pass@{b.pass_k}": passk}))
