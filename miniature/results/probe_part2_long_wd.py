"""Probe after probe_part2_recipe.py and probe_part2_lr_low.py (miniature/README.md; rule written before it ran): do
the two changes that each lifted seed 1's dev R, twice the part-2 steps and weight decay 0.1, together bring Stage 1
to reading a fresh entry on both seeds?

At 4,000 part-2 steps, run 6's seed 1 reads dev R 57.2; twice the steps 79.2, weight decay 0.1 82.2 (seed 2: 81.2 at
4,000 steps, 73.5 with weight decay); no lr between 1e-3 and 6e-3 qualified. This runs part 2 at 8,000 steps with
weight decay 0.1 from run 6's own part-1 checkpoints, seeds 1 and 2 (seed 2 first, since its 4,000-step weight-decay
run is the one that fell back), then dev and dev R. About 18 minutes a seed.

Rule: adopted as the Stage 1 the convergence gate is next run on (sft_steps 8,500, weight decay 0.1 on Stage 1's SFT
runs; the gate then needs a 16,000-step part 2, about 35 minutes a seed) iff on both seeds dev R >= 90, dev T >= 97
and dev G at most 2 points under run 6's (54.3 / 84.3). Otherwise not adopted; the README reports the numbers.

    PYTHONPATH=. python miniature/results/probe_part2_long_wd.py /work/runs/run6     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_part2_recipe import part2  # noqa: E402


def main(root):
    b, result, out = R.Budget(), {}, Path(__file__).with_name("probe_part2_long_wd_seeds12.json")
    for seed in (2, 1):
        work = root / f"seed_{seed}"
        stage = R.Stages(work)
        result[seed] = part2(work, stage, b, "sft_long_wd0.1", None, ["--weight-decay", 0.1], factor=b.long_factor)
        result[seed]["run6_dev_G"] = stage.done["dev_sft_template"]["G"]
        r = result[seed]
        print(f"seed {seed}: dev R {100 * r['dev_R']:.1f}, dev T {100 * r['dev_T']:.1f}, dev G {100 * r['dev_G']:.1f}"
              f" (run 6 {100 * r['run6_dev_G']:.1f}), {r['seconds']:.0f} s", flush=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    result["rule"] = "adopted" if all(r["dev_R"] >= 0.90 and r["dev_T"] >= 0.97 and r["dev_G"] >= r["run6_dev_G"] - 0.02
                                      for r in result.values()) else "not adopted"
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print("rule:", result["rule"], flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
