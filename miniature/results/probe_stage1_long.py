"""Probe after probe_stage1_continue.py's two arms failed (rules in its docstring): is Stage 1's stall on seeds 3 and 4
one of part 2's length under its own cosine?

Continuing the adopted Stage 1 for 4,000 steps (at its final lr, or at 1e-3) left dev R where it was (seed 3 79-81,
seed 4 63-72): a plateau, not the lr's tail. This runs the convergence gate's longer part 2 (run.stage1_gates'
`sft_long`: part 2 at long_factor x 8,000 = 16,000 steps from part 1's checkpoint, its cosine from 3e-3 to 3e-4,
weight decay 0.1, part 2's data and seed; the same command, plus `--save-every 2000 --keep 0` for a trace), recorded
in the seed's stages.json so that `run.py --gates` reuses it, then dev R / T / G at its last checkpoint first (the
verdict) and then at every 2,000th step. Seeds 3 and 4 in parallel, 1 core each.

Rule (written before it ran; the continuations predict FAIL, their dev R had flattened by step 7,500):
- dev R >= 85 with dev T >= 97 at step 16,500 on both seeds -> the stall is part 2's length: the next session
  adopts part 2 at 16,000 steps (Budget.sft_steps 16,500; seeds 1 and 2 read 93.0 / 95.7 at this length,
  so the robustness rule then holds on seeds 1-4) and runs the no-G-distractor arm (probe_g_replay.py) on it.
- otherwise -> the recipe, not its length, is what varies across draws: Stage 1 at this size settles on a partial
  reading solution on some seeds. The next session's first arm targets the step the stalled students get wrong
  (probe_dev_r_errors.py: the same-line 有/无 check, then the copy), its rule written before it runs; the
  length stays 8,500 (twice the compute bought nothing that could be measured).
Also recorded: the trace's shape against the 8,500-step run's (probe_stage1_trace.py), i.e. whether the slower
cosine moves the transition's start (dev R 12-20 until step 3,500-4,500 at 8,500 steps).

    PYTHONPATH=. python miniature/results/probe_stage1_long.py /work/runs/robust_s3/seed_3    # from the repo root

Session 17 ran it on a new machine (session 16's runs were lost with their machine, unfinished): the folder is then
built first, exam to part 1 and its critiques, by the Budget's own stages (run.part1_folder). Its data are the
same; part 1's training and sampling run on another CPU, so the folder may be another draw of part 1 and of its
critiques (part 2's loss over its first 500 steps: seed 3 0.388 against the lost run's 0.387, seed 4 0.416
against 0.392).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_stage1_trace import kept_part2, trace  # noqa: E402

EVERY = 2000

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work", help="a seed's folder (<dir>/seed_<n>); exam to part 1 built if absent")
work = Path(parser.parse_args().work)
b, seed = R.Budget(), int(work.name.split("_")[-1])
stage = R.part1_folder(work, b, seed)
early = stage.done["sft_early"]["checkpoint"]
steps = b.long_factor * (b.sft_steps - b.early_steps)
run = stage("sft_long", lambda: R.sft(work, "sft_long", ["--model", early], work / "stage1_part2.jsonl", steps,
                                      b.sft_lr, b.batch, b.cot_micro, seed, extra=R.part2_flags(b),
                                      save_every=EVERY))
rows = trace(work, kept_part2(work / "sft_long", b), b, tag="long")
result = {"sft_long": run, "trace": sorted(rows, key=lambda row: row["step"])}
(work / "stage1_long.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
