"""Probe after the dev-R probe (miniature/README.md; rule written before it ran): do more reading questions make Stage
1 read a fresh entry, at the same steps?

Dev R (held-out reading questions) is 37-81 on every Stage 1 checkpoint so far, where dev T is 93-100, and it is now
part of the convergence gate. The cheapest change that costs no SFT time: 2,000 reading questions in Stage 1 instead
of 600, as many as the T questions, every other budget as run 6 (mixed G, sampler 0.7 / 0.9 everywhere, 4,500 SFT
steps). The exam's T, G and U questions are the same as run 6's; Stage 1 gains 1,400 reading questions (the first
600 are run 6's). Only Stage 1 and its dev evaluations run (dev, dev R, dev-G pass@4), seeds 0, 1 and 2 in turn,
about 18 minutes a seed; not the convergence gate's longer run.

Rule: if on all three seeds template SFT's dev R is at least 90 and dev T at least 95, `Budget.reading_questions`
becomes 2,000 and the next run is the three-seed table with --gates; otherwise it is not adopted, and the README
reports dev R, T and G per seed beside run 6's (57.2 / 81.2 dev R on seeds 1 / 2; seed 0's run-6 folder is gone).

    PYTHONPATH=. python miniature/results/probe_reading_share.py --out /work/runs/probe_reading_share    # repo root
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


def stage1_dev(b, out, seeds):
    """Stage 1 under budget b and its dev evaluations (dev, dev R, dev-G pass@k), seed by seed, into out/stage1.json;
    returns {seed: numbers}."""
    result = {}
    for seed in seeds:
        work = out / f"seed_{seed}"
        work.mkdir(parents=True, exist_ok=True)
        stage, start = R.Stages(work), time.time()
        kb, pre = R.prepare(work, stage, b, seed)
        server, url, _ = teacher.serve(kb)
        try:
            early, data, t = R.stage1(work, stage, b, seed, pre, url)
        finally:
            server.shutdown()
        dev = stage("dev_sft_template", lambda: R.evaluate(work, "sft_template", t, b, "dev"))
        dev_r = stage("dev_R_sft_template", lambda: R.evaluate(work, "sft_template", t, b, "dev_R"))
        pass1, passk = R.dev_pass_at_k(work, stage, "dev_samples", t, b, seed)
        result[seed] = {"dev_R": dev_r["groups"]["Disease Split=R"], "dev_T": dev["T"], "dev_G": dev["G"],
                        "pass@1": pass1, f"pass@{b.pass_k}": passk, "dev_groups": dev["groups"],
                        "dev_R_groups": dev_r["groups"], "seconds": {k: v["seconds"] for k, v in stage.done.items()}}
        (out / "stage1.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        r = result[seed]
        print(f"seed {seed}: dev R {100 * r['dev_R']:.1f}, dev T {100 * r['dev_T']:.1f}, dev G "
              f"{100 * r['dev_G']:.1f}, pass@1 {100 * pass1:.1f} -> pass@{b.pass_k} {100 * passk:.1f}, "
              f"{time.time() - start:.0f} s", flush=True)
    return result


def main(field="reading_questions", value=2000, quick_value=60, seeds="0,1,2",
         verdicts=("adopted", "not adopted"), doc=__doc__):
    """The probe's command line: Stage 1 with one Budget field changed, then its rule (dev R >= 90 and dev T >= 95
    on every seed)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default=seeds)
    parser.add_argument("--quick", action="store_true", help="R.QUICK's budget: the plumbing only")
    args = parser.parse_args()
    b = dataclasses.replace(R.QUICK if args.quick else R.Budget(), **{field: quick_value if args.quick else value})
    result = stage1_dev(b, Path(args.out), [int(s) for s in args.seeds.split(",")])
    adopted = all(r["dev_R"] >= 0.90 and r["dev_T"] >= 0.95 for r in result.values())
    print("rule:", verdicts[0] if adopted else verdicts[1], flush=True)


if __name__ == "__main__":
    main()
