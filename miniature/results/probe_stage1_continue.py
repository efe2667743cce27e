"""Probe after the robustness arm of probe_g_replay.py (rule written before it ran): is Stage 1's failure on seeds 3
and 4 one of steps alone?

The adopted Stage 1 (8,500 steps, part 2 with weight decay 0.1) ended at dev R 81.5 (seed 3) and 71.8 (seed 4), the
bar 85, on the clean corpus. Seed 4's trace (probe_stage1_trace.py, every 1,000 part-2 steps): dev R 12-16 up to
step 3,500, then 29, 43, 64, 70, 72, dev T 97 only from step 6,500: the read-the-entry transition starts late on
this draw and is still moving when the cosine has brought the lr down to 3e-4. Here each seed's template SFT is
continued for 4,000 steps at that final lr, constant, with part 2's weight decay (run.continued, the matched-compute
row's recipe) on part 2's data, checkpoints every 1,000, and dev R / T / G traced at each, seeds 3 and 4 in parallel
on 1 core each.

Rule: dev R >= 85 with dev T >= 97 on both seeds by the 4,000th step -> the failure is one of steps alone, and the
next session chooses part 2's length on dev R (a longer Budget.sft_steps run from part 1 with its cosine, on seeds 1-4).
Either seed gaining under 5 points of dev R over the 4,000 steps -> the final lr cannot finish the transition, and
the next session runs part 2 at 16,000 steps (its cosine) from part 1 on seeds 3 and 4. Otherwise recorded, and
the next session runs the latter.

    PYTHONPATH=. python miniature/results/probe_stage1_continue.py /work/runs/robust_s3/seed_3    # repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_stage1_trace import trace  # noqa: E402

STEPS, EVERY = 4000, 1000

work = Path(sys.argv[1])
b, seed = R.Budget(), int(work.name.split("_")[-1])
t = json.loads((work / "stages.json").read_text())["sft_template"]["checkpoint"]
run = R.continued(work, "sft_continue", t, work / "stage1_part2.jsonl", STEPS, b, seed, save_every=EVERY)
kept = sorted((work / "sft_continue").glob("step-*"))
steps = [(b.sft_steps + int(c.name[5:]), c) for c in kept]
result = {"continued": {**run, "lr": b.sft_lr * 0.1, "weight_decay": b.part2_weight_decay}, "trace": trace(work, steps)}
(work / "stage1_continue.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
