"""Probe (session 17; rule written before it ran): do seeds 3 and 4 stall again when their folders are rebuilt on
another machine, or was session 15's stall a draw of the training's float path?

Session 16's runs were lost with their machine. Rebuilt here by run.part1_folder (the same exam, the same teacher
data, the same seeds; part 1's training and its samples for the critiques on another CPU), the 16,000-step part 2
(probe_stage1_long.py) had a different loss from its first 500 steps on (seed 3 0.388 vs 0.387, seed 4 0.416 vs
0.392), and by steps 2,500-3,000 it was below the stalled runs' (0.198 / 0.205 against session 16's 0.236 / 0.253 at
the same lr, and session 15's 0.232 / 0.246 with 8,000 steps), in the range of session 14's four runs
(0.188-0.214; two of them broke later on their G corpora, a slip in this docstring's first version). So the
rebuilt folders are other draws, and no verdict of probe_stage1_long on part 2's length could be read against
session 15's stalled runs. It was stopped at step ~3,650 (seed 3 3,662, seed 4 3,629) and this
runs instead, in the same folders, the adopted Stage 1's part 2 (run.stage1_part2: 8,000 steps, the Budget's
recipe, the seed's own batch order), its checkpoints kept every 1,000 steps, then dev R / T / G at the end first
(the verdict) and at every kept checkpoint (probe_stage1_trace.trace). Seeds 3 and 4 in parallel, 1 core each.

Rule (the prediction from the loss: both read):
- dev R >= 85 with dev T >= 97 on both seeds -> session 15's stall on seeds 3 and 4 was not the seeds' data but the
  draw of training (the same data and seeds, another float path); the adopted recipe then reads on 5 of 8 runs
  (with session 14's two broken runs on other G corpora), and Stage 1's robustness is a rate to raise, measured over
  draws, not a seed to fix. The next arm changes the recipe and is judged by its rate over rebuilt draws (the
  order probe, which asks the same of the batch order, is then moot on these folders).
- both stall (dev R < 85 or dev T < 97) -> the seeds' data decide, whatever the float path: probe_stage1_long and
  probe_stage1_order on these folders, as their rules say.
- mixed -> both matter; recorded, and the stalled seed's folder is the one the next arms run on.

    PYTHONPATH=. python miniature/results/probe_stage1_redraw.py /work/runs/robust_s3/seed_3    # from the repo root
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_stage1_trace import kept_part2, trace  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work", help="a seed's folder (<dir>/seed_<n>); exam to part 1 built if absent")
work = Path(parser.parse_args().work)
seed = int(work.name.split("_")[-1])
b = dataclasses.replace(R.Budget(), part2_save_every=1000)
stage = R.part1_folder(work, b, seed)
early = stage.done["sft_early"]["checkpoint"]
adopted = R.stage1_part2(work, stage, b, seed, early, work / "stage1_part2.jsonl")
rows = trace(work, kept_part2(work / "sft_template", b), b, tag="redraw")
result = {"sft_template": stage.done["sft_template"], "trace": sorted(rows, key=lambda row: row["step"])}
(work / "stage1_redraw.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
