"""Probe, run only if probe_stage1_long.py's rule fails (this rule written before its result was known): on seeds 3
and 4, is Stage 1's stall decided by part 2's batch order or by where part 1 left the student?

Same part-1 checkpoint, part 2's data, length (8,000 steps), lr, cosine and weight decay as the adopted Stage 1; only
sft.py's `--seed`, which here sets nothing but the batch order (the model is loaded, not initialised), is 1000 + the
seed. Dev R / T / G at the end (probe_stage1_trace.trace). Seeds 3 and 4 in parallel, 1 core each. (Session 11 saw
an order change move a 4,500-step run's dev R by 8 points, 45.2 to 37.0.)

Rule:
- dev R >= 85 with dev T >= 97 on both seeds -> the same start reads under another order: part 2's outcome is a draw
  of its batch order, and the next session's arm lowers the order's weight in it (part 2 at batch 16, the same 8,000
  steps, on seeds 1-4; the robustness rule as in probe_g_replay.py).
- under that on both seeds -> the start decides (pretraining and part 1 on that seed): the next session's arm
  changes what part 1 teaches, so that the lookup forms before the memory shortcut settles (its rule written first).
- otherwise -> both matter; recorded, and the next session runs the batch-16 arm first (the cheaper to read).

Session 17 (written before probe_stage1_long's result was known, after its folders had to be rebuilt on a new
machine): a rebuilt folder may be another draw of part 1 and its critiques (probe_stage1_long's docstring), so the
stalled 8,500-step runs of session 15 are no baseline for it. The probe therefore also runs, in the same folder, the
adopted part 2 under the seed's own order (run.stage1_part2, stage "sft_template", if absent) and evaluates both.
The rule above is read on the seeds whose adopted part 2 stalls in that folder (dev R < 85 or dev T < 97); a seed
whose adopted part 2 reads there adds a reading draw to the robustness tally instead (three of six before), and if
neither seed stalls there is no verdict on the order and the tally is what is recorded.

    PYTHONPATH=. python miniature/results/probe_stage1_order.py /work/runs/robust_s3/seed_3    # from the repo root
"""
import argparse
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
from probe_stage1_trace import trace  # noqa: E402

ORDER = 1000

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("work", help="a seed's folder (<dir>/seed_<n>); exam to part 1 built if absent")
work = Path(parser.parse_args().work)
b, seed = R.Budget(), int(work.name.split("_")[-1])
stage = R.part1_folder(work, b, seed)
early, data = stage.done["sft_early"]["checkpoint"], work / "stage1_part2.jsonl"
adopted = R.stage1_part2(work, stage, b, seed, early, data)
name = f"sft_order{ORDER + seed}"
run = R.sft(work, name, ["--model", early], data, b.sft_steps - b.early_steps, b.sft_lr, b.batch, b.cot_micro,
            ORDER + seed, extra=R.part2_flags(b))
result = {name: run, "sft_template": stage.done["sft_template"],
          "trace": trace(work, [(b.sft_steps, Path(run["checkpoint"]))], b, tag=name[4:]),
          "trace_adopted": trace(work, [(b.sft_steps, Path(adopted))], b, tag="adopted")}
(work / f"stage1_{name[4:]}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
