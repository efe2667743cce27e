"""Probe after the wider-student probe (miniature/README.md; rule written before it ran): does Stage 1 part 2 learn to
read a fresh entry faster with a higher lr or with weight decay, at the same 4,000 steps?

Dev R (held-out reading questions) is 37-81 on every Stage 1 run, where dev T is 93-100, and twice the steps add
13-35 points: the check "is this finding in the recited entry" is still being learned when T is done. T's checks
can be answered from memory of (disease, finding) pairs, so part 2 fits them by memorisation, and the reading
circuit is learned slowly beside it. Two changes to part 2 that cost no time, each known to speed up the move from
memorising to a general circuit in small transformers:
- lr 6e-3 instead of 3e-3 (cosine to 0.1x as before);
- AdamW weight decay 0.1 on the matrices (pretraining's; part 2 has none): weight decay favours the circuit that
  fits the data with small weights over a lookup table (Nanda et al. 2023, grokking).
Each arm reruns run 6's part 2 from run 6's own part-1 checkpoint (`sft_early`), same data file, same 4,000 steps,
batch and seed, on seeds 1 and 2 (seed 0's folder is gone), then evaluates dev and dev R. About 12 minutes an arm.

Rule: an arm qualifies if on both seeds its dev R is at least 10 points over run 6's at 3e-3 (57.2 / 81.2), or at
least 95, its dev T at least 95, and its dev G at most 2 points under run 6's (54.3 / 84.3: the G entries are
knowledge weight decay could erase). The qualifying arm with the higher mean dev R is adopted into Budget and its
twice-as-long part 2 (8,000 steps) is run on seed 1 to check the convergence gate (<= 2 points on dev T and dev R);
if none qualifies, neither is adopted and the lever left is steps. An arm that fails the rule on seed 1 is not run on
seed 2 (the rule asks both seeds, so its verdict is already known; added after seed 1's lr 6e-3 arm, verdicts
unchanged).

    PYTHONPATH=. python miniature/results/probe_part2_recipe.py /work/runs/run6     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402

ARMS = {"lr6e-3": (6e-3, []), "wd0.1": (None, ["--weight-decay", 0.1])}


def part2(work, stage, b, name, lr, extra, factor=1):
    """Run 6's part 2 under one change, then dev and dev R."""
    early = stage.done["sft_early"]["checkpoint"]
    run = stage(name, lambda: R.sft(work, name, ["--model", early], work / "stage1_part2.jsonl",
                                    factor * (b.sft_steps - b.early_steps), lr or b.sft_lr, b.batch, b.cot_micro,
                                    int(work.name.split("_")[1]), extra=extra))
    dev = stage(f"dev_{name}", lambda: R.evaluate(work, name, run["checkpoint"], b, "dev"))
    dev_r = stage(f"dev_R_{name}", lambda: R.evaluate(work, name, run["checkpoint"], b, "dev_R"))
    return {"dev_R": dev_r["groups"]["Disease Split=R"], "dev_T": dev["T"], "dev_G": dev["G"],
            "dev_groups": dev["groups"], "dev_R_groups": dev_r["groups"], "seconds": run["seconds"]}


BASE = "run6 (lr 3e-3, wd 0)"


def qualifies(r, arm):
    """The rule on one seed's numbers r."""
    return ((r[arm]["dev_R"] >= r[BASE]["dev_R"] + 0.10 or r[arm]["dev_R"] >= 0.95) and r[arm]["dev_T"] >= 0.95
            and r[arm]["dev_G"] >= r[BASE]["dev_G"] - 0.02)


def main(root, arms=ARMS, out_name="probe_part2_recipe_seeds12.json"):
    b, result, out = R.Budget(), {}, Path(__file__).with_name(out_name)
    for seed in (1, 2):
        work = root / f"seed_{seed}"
        stage = R.Stages(work)
        base = {"dev_R": stage.done["dev_R_sft_template"]["groups"]["Disease Split=R"],
                "dev_T": stage.done["dev_sft_template"]["T"], "dev_G": stage.done["dev_sft_template"]["G"]}
        result[seed] = {BASE: base}
        for arm, (lr, extra) in arms.items():
            if seed != 1 and not qualifies(result[1], arm):
                continue
            result[seed][arm] = part2(work, stage, b, f"sft_template_{arm}", lr, extra)
            r = result[seed][arm]
            print(f"seed {seed} {arm}: dev R {100 * r['dev_R']:.1f} (run 6 {100 * base['dev_R']:.1f}), dev T "
                  f"{100 * r['dev_T']:.1f}, dev G {100 * r['dev_G']:.1f} (run 6 {100 * base['dev_G']:.1f})", flush=True)
            out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    passing = [a for a in arms if all(a in r and qualifies(r, a) for r in result.values())]
    chosen = max(passing, key=lambda a: sum(r[a]["dev_R"] for r in result.values()), default=None)
    result["rule"] = {"qualifying": passing, "adopted": chosen}
    if chosen:  # the convergence gate's longer run, on the slower seed
        work = root / "seed_1"
        lr, extra = arms[chosen]
        long = part2(work, R.Stages(work), b, f"sft_long_{chosen}", lr, extra, factor=b.long_factor)
        short = result[1][chosen]
        result["seed_1_longer"] = {**long, "converged": R.at_most(long["dev_T"] - short["dev_T"], 0.02)
                                   and R.at_most(long["dev_R"] - short["dev_R"], 0.02)}
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps(result["rule"]), json.dumps(result.get("seed_1_longer", {}).get("converged")), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
