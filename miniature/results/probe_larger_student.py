"""Probe after the reading-share probe (miniature/README.md; rule written before it ran): does a wider student learn
to read a fresh entry within Stage 1's steps?

Dev R (held-out reading questions) stays at 37-81 on every Stage 1 so far, and 2,000 reading questions instead of 600
made it worse at the same steps (seed 0: dev R 20.7, dev T 41.3). The student may be too small to learn the lookup
in 4,500 steps. This runs Stage 1 with hidden 256 instead of 128 (4 layers, so about 3.4x the parameters), every other
budget as run 6, on seed 1, whose run-6 folder has the same exam (and dev_R.csv) at hidden 128: dev R 57.2, dev T
95.7, dev G 54.3. Only Stage 1 and its dev evaluations (probe_reading_share.stage1_dev); about 45 minutes.

Rule: if dev R is at least 90 and dev T at least 95, a wider student is what the next session tries on three seeds
(and it must find the time); otherwise width alone is not the fix, and the README says so beside the hidden-128
numbers.

    PYTHONPATH=. python miniature/results/probe_larger_student.py --out /work/runs/probe_larger_student   # repo root
"""
import argparse
import dataclasses
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_reading_share import stage1_dev  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True)
parser.add_argument("--seeds", default="1")
parser.add_argument("--quick", action="store_true", help="R.QUICK's budget: the plumbing only")
args = parser.parse_args()
b = dataclasses.replace(R.QUICK if args.quick else R.Budget(), hidden=128 if args.quick else 256)
result = stage1_dev(b, Path(args.out), [int(s) for s in args.seeds.split(",")])
adopted = all(r["dev_R"] >= 0.90 and r["dev_T"] >= 0.95 for r in result.values())
print("rule:", "a wider student is the next candidate" if adopted else "width alone is not the fix", flush=True)
