"""Probe after the reading probe (probe_reading_stage1.py): with reading questions, template SFT's checks on T went
wrong (dev T 97.0 -> 73.7, the recited entries still right, the 有/无 marks after them wrong) while dev-G pass@4
rose to 20.5 points over pass@1. Is the in-line lookup being learned, only not yet? Stage 1 part 2 run twice as long
(run.py's own sft_long stage, the convergence gate's run: 4,000 steps from the same part-1 checkpoint and data),
then its dev evaluation, its dev-G samples (pass@k) and the reading probe on it.

The rule, fixed before it ran: the lookup counts as learnable at this size if the long run's dev T is at least 95.0
and its dev G at least 31.0 (the first probe's bars); then the reading design is worth a full run at the longer
Stage 1, and the time budget has to give. Otherwise the reading questions are dropped.

    PYTHONPATH=. python miniature/results/probe_reading_long.py /work/runs/run5     # from the repo root
"""
import json
import subprocess
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402

out, b, seed = Path(sys.argv[1]), R.Budget(), 0
work = out / f"seed_{seed}"
stage = R.Stages(work)
early, data = stage.done["sft_early"]["checkpoint"], work / "stage1_part2.jsonl"
long = stage("sft_long", lambda: R.sft(work, "sft_long", ["--model", early], data,
                                       b.long_factor * (b.sft_steps - b.early_steps), b.sft_lr, b.batch,
                                       b.cot_micro, seed))
dev = stage("dev_sft_long", lambda: R.evaluate(work, "sft_long", long["checkpoint"], b, "dev"))
stage("probe_dev_samples_long", lambda: R.selfplay(work, "dev_samples_long", long["checkpoint"],
                                                   work / "data" / "dev_G.csv", b, seed, "--sources", "sample",
                                                   samples=b.pass_k) or {})
pass1, passk = R.pass_at_k(work, "dev_samples_long")
reads = json.loads(subprocess.run([sys.executable, "miniature/results/probe_reads_own_line.py", str(work),
                                   "sft_long"], check=True, capture_output=True, text=True).stdout)
result = {"steps": long["steps"], "dev_G": dev["G"], "dev_T": dev["T"], "pass@1": pass1, f"pass@{b.pass_k}": passk,
          "learnable": dev["T"] >= 0.95 - 1e-9 and dev["G"] >= 0.31 - 1e-9, "reads_own_line": reads,
          "seconds": {k: stage.done[k]["seconds"] for k in ("sft_long", "dev_sft_long", "probe_dev_samples_long")}}
print(json.dumps(result, ensure_ascii=False, indent=1))
(Path(__file__).parent / "probe_reading_long_seed0.json").write_text(json.dumps(result, ensure_ascii=False,
                                                                                 indent=1) + "\n")
