"""Probe after probe_chosen_side.py (miniature/README.md; rule written before it ran): do the pairs only a correction
can make add anything?

On seed 1, 199 of self-correction round 1's 438 pairs are on questions where none of the student's own 14 samples was
right: there only the critique can supply a chosen reply, which is the case MedCritical's Stage 2 is for. Dropping
them cost -0.8 [-2.3, +0.7] on test G at the same steps. Two rows here, each for round 1's optimizer steps with
Budget.dpo's flags, on run 6's folders:
  - hybrid: every one of round 1's pairs, in order, its rejected reply as it is, its chosen reply the student's own
    right sample where the question has one (probe_chosen_side's choice) and the correction where it has none. It
    is Iterative RPO on round 1's wrong samples, completed by the critique where sampling found nothing;
  - correction only: the pairs with no own right sample, alone.

Rule: on seed 1, the paired difference on test G of hybrid minus probe_chosen_side's own-right row (the same pairs
less the correction-only ones, the same steps), with its 95% interval. If it excludes 0 in the hybrid's favour, the
pairs only a correction can make add something beyond the student's own right answers; otherwise they add nothing
measurable at this size. Seed 2 (24 such pairs) is reported and not counted. Also: each row against template SFT.

    PYTHONPATH=. python miniature/results/probe_correction_only.py /work/runs/run6 1,2     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "miniature/results", "."]
import run as R  # noqa: E402
import templates as T  # noqa: E402
from probe_chosen_side import own_right_pairs, train_and_test  # noqa: E402

result = {}
for seed in [int(s) for s in sys.argv[2].split(",")]:
    work = Path(sys.argv[1]) / f"seed_{seed}"
    own, _, only, _ = own_right_pairs(work)
    own_by_rejected = {(p["id"], p["rejected"][0]["content"]): p for p in own}
    hybrid = [own_by_rejected.get((p["id"], p["rejected"][0]["content"]), p)
              for p in T.read_jsonl(work / "selfplay" / "round_1" / "pairs.jsonl")]
    stage, evals = train_and_test(work, seed, (("dpo_hybrid", hybrid), ("dpo_correction_only", only)))
    result[seed] = {"pairs": {"hybrid": len(hybrid), "of_them_own_right": len(hybrid) - len(only),
                              "correction_only": len(only)},
                    "steps": {key: stage.done[key]["steps"] for key in evals},
                    "hybrid vs own right": {x: R.paired_difference(stage.done["eval_dpo_own_right"],
                                                                   evals["dpo_hybrid"], x) for x in "GTU"},
                    "hybrid vs selfplay_1": {x: R.paired_difference(stage.done["eval_selfplay_1"],
                                                                    evals["dpo_hybrid"], x) for x in "GTU"},
                    **{f"{key} vs sft_template": {x: R.paired_difference(stage.done["eval_sft_template"], ev, x)
                                                  for x in "GTU"} for key, ev in evals.items()}}
    d = result[seed]["hybrid vs own right"]["G"]
    print(f"seed {seed}: hybrid minus own right on test G {100 * d['diff']:+.1f} "
          f"(95% {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}), pairs {result[seed]['pairs']}", flush=True)
print(json.dumps(result, indent=1, ensure_ascii=False))
