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

The higher-lr arm (written after the rule above had failed, on seed 4: dev R 69.2, 69.5, 69.3, 68.5 over the
4,000 steps at 3e-4, against 71.8 at step 8,500; seed 3's trace still running, and before this arm ran). Is the stall
the cosine's low tail? `--lr 1e-3` (a third of the peak, a fresh AdamW, so 100 warmup steps), otherwise as above,
from the same step-8,500 checkpoints, seeds 3 and 4 in parallel. Rule: dev R >= 85 with dev T >= 97 on both seeds
by the 4,000th step -> the stall is the lr's tail, and the next session's first arm is part 2 at its 8,000 steps
with the cosine ending at 1e-3 (sft.py --min-lr-ratio 1/3) on seeds 1-4, before any longer part 2. Otherwise the
next session runs part 2 at 16,000 steps (its cosine) from part 1 on seeds 3 and 4, as the rule above says.

    PYTHONPATH=. python miniature/results/probe_stage1_continue.py /work/runs/robust_s3/seed_3    # repo root
    PYTHONPATH=. python miniature/results/probe_stage1_continue.py /work/runs/robust_s3/seed_3 --lr 1e-3
"""
import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_stage1_trace import trace  # noqa: E402

STEPS, EVERY, WARMUP = 4000, 1000, 0.025  # warmup: sft.py takes a share of the steps (100 of 4,000)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work", help="a seed's folder with Stage 1 done")
parser.add_argument("--lr", type=float, default=None,
                    help="constant lr after a warmup of WARMUP of the steps (default: Stage 1's final lr, "
                         "run.continued, no warmup)")
args = parser.parse_args()
work = Path(args.work)
b, seed = R.Budget(), int(work.name.split("_")[-1])
t = json.loads((work / "stages.json").read_text())["sft_template"]["checkpoint"]
name, lr, warmup = ("sft_continue", b.sft_lr * 0.1, 0) if args.lr is None else \
    (f"sft_continue_lr{args.lr:g}", args.lr, WARMUP)
run = R.continued(work, name, t, work / "stage1_part2.jsonl", STEPS, b, seed, save_every=EVERY, lr=lr, warmup=warmup)
steps = [(b.sft_steps + int(c.name[5:]), c) for c in sorted((work / name).glob("step-*"))]
result = {"continued": {**run, "lr": lr, "warmup": warmup, "weight_decay": b.part2_weight_decay},
          "trace": trace(work, steps, b, tag=name.replace("sft_", ""))}
(work / f"stage1_{name[4:]}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
