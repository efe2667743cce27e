"""Probe after run 6 (miniature/README.md; rule written before it ran): a testbed whose G has headroom on every seed.

Run 6's headroom gate failed on all three seeds, and probe_headroom_sampling.py (seeds 1 and 2, dev G) located where:
the 多选 (multiple-answer) questions are the only type with room on both seeds, and sampling at temperature 1.0,
top-p 1.0 widens their pass@4 - pass@1 gap (seed 1: 30.4 -> 59.8, seed 2: 68.2 -> 83.3) where 诊断 stays settled
(seed 2: 88.3 -> 91.9). The candidate testbed, every other budget as run 5:
  - G questions (Stage 2, dev G, test G) are all 多选 (`Budget.g_type_weights = (0, 0, 1)`); T and U keep the mix.
  - Stage 2 samples at temperature 1.0, top-p 1.0, everywhere it samples (self-play, the baselines, the gate, and
    Stage 1's critique data, which uses the same sampler).
This runs only what the two Stage 1 gates need (the exam, pretraining, Stage 1, dev evaluations, dev samples, and
the convergence gate's longer run when dev T is under 98), seeds 0, 1 and 2 in turn.

Rule: if both Stage 1 gates (converged, G headroom) pass on all three seeds, the candidate becomes `Budget`'s
default and the next run is the three-seed table with --gates; if any seed fails either, it is not adopted, and the
README reports which gate failed where.

    PYTHONPATH=. python miniature/results/probe_g_multi.py --out /work/runs/probe_g_multi     # from the repo root
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402
import teacher  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--out", required=True)
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--quick", action="store_true", help="R.QUICK's budget: the plumbing only")
args = parser.parse_args()
b = dataclasses.replace(R.QUICK if args.quick else R.Budget(), g_type_weights=(0, 0, 1), temperature=1.0, top_p=1.0)
out = Path(args.out)
result = {}
for seed in [int(s) for s in args.seeds.split(",")]:
    work = out / f"seed_{seed}"
    work.mkdir(parents=True, exist_ok=True)
    stage, start = R.Stages(work), time.time()
    kb, pre = R.prepare(work, stage, b, seed)
    server, url, _ = teacher.serve(kb)
    try:
        early, data, t = R.stage1(work, stage, b, seed, pre, url)
    finally:
        server.shutdown()
    result[seed] = {**R.stage1_gates(work, stage, b, seed, data, early),
                    "seconds": {k: v["seconds"] for k, v in stage.done.items()}}
    (out / "stage1_gates.json").write_text(json.dumps(result, indent=1) + "\n")
    g = result[seed]
    print(f"seed {seed}: converged {g['stage1_converged']}, headroom {g['G_headroom']}, "
          f"{time.time() - start:.0f} s", flush=True)
