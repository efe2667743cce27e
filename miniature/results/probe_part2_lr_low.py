"""Probe after seed 1's lr 6e-3 arm of probe_part2_recipe.py (miniature/README.md; rule written before it ran): does
Stage 1 part 2 read a fresh entry sooner at a LOWER lr, at the same 4,000 steps?

At lr 6e-3 run 6's seed-1 part 2 learned more slowly, not less stably (no loss spike, the grad norm as at 3e-3; the
training loss 0.195 against 0.147 over its last 500 steps), and landed at dev R 19.5, dev T 25.0, dev G 24.0
against 57.2 / 95.7 / 54.3 at 3e-3. So 3e-3 is already past the fastest lr for this student, and the wider
student's worse numbers at the same lr (hidden 256: 14.2 / 38.7) fit the same cause. The arms: part 2 at lr 1.5e-3
and at 1e-3 (cosine to 0.1x, everything else as run 6's part 2), from run 6's own part-1 checkpoint (trained at
3e-3; if an arm is adopted, Budget.sft_lr changes for every Stage 1 run and the next table reruns part 1 too).

Rule: probe_part2_recipe.py's, unchanged: an arm qualifies if on both seeds its dev R is at least 10 points over run
6's (57.2 / 81.2) or at least 95, its dev T at least 95 and its dev G at most 2 points under run 6's (54.3 / 84.3);
the qualifying arm with the higher mean dev R is adopted and its twice-as-long part 2 is run on seed 1 for the
convergence gate. An arm failing on seed 1 is not run on seed 2.

    PYTHONPATH=. python miniature/results/probe_part2_lr_low.py /work/runs/run6     # from the repo root
"""
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import probe_part2_recipe  # noqa: E402

if __name__ == "__main__":
    probe_part2_recipe.main(Path(sys.argv[1]), {"lr1.5e-3": (1.5e-3, []), "lr1e-3": (1e-3, [])},
                            "probe_part2_lr_low_seeds12.json")
