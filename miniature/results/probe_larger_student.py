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
import sys

sys.path[:0] = ["miniature", "miniature/results", "."]
from probe_reading_share import main  # noqa: E402

main("hidden", 256, 128, seeds="1", verdicts=("a wider student is the next candidate", "width alone is not the fix"),
     doc=__doc__)
