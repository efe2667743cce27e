"""The three-seed table from per-seed table.json files as run.py writes them (seed 0 was run alone, run 5; seeds 1
and 2 together, run 6), and the issue's criterion for "the method works" checked row by row.

    python miniature/results/three_seeds.py miniature/results/run5_seed0.json miniature/results/run6_seeds12.json

Every difference is within one seed (same test questions), so G(row) - G(other) is that seed's paired difference;
"the paired spread" is its standard deviation over the seeds.
"""
import json
import statistics
import sys

sys.path.insert(0, "miniature")
import run  # noqa: E402

everything = {}
for path in sys.argv[1:]:
    everything.update(json.load(open(path, encoding="utf-8")))
seeds = sorted(everything, key=int)
tables = [everything[s]["table"] for s in seeds]
run.print_table(tables, seeds)


def g(seed, key, split="G"):
    return next(r[split] for r in everything[seed]["table"] if r["key"] == key)


def per_seed(key, other, split="G"):
    return [100 * (g(s, key, split) - g(s, other, split)) for s in seeds]


def line(name, diffs):
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    each = " / ".join(f"{d:+.1f}" for d in diffs)
    return f"  {name:46} {statistics.mean(diffs):+6.1f} ± {sd:4.1f}   per seed {each}"


print("\nThe issue's criterion (self-correction DPO round 2 = selfplay_2), points on test G unless said:")
r2_vs_template = per_seed("selfplay_2", "sft_template")
print(line("round 2 - template SFT (>= 3, every seed > 0)", r2_vs_template))
for other, name in (("rft", "RFT"), ("rpo", "Iterative RPO")):
    print(line(f"round 2 - {name} (> its spread)", per_seed("selfplay_2", other)))
print(line("round 2 - teacher-corrected DPO (>= -2)", per_seed("selfplay_2", "dpo_teacher")))
print(line("round 2 - template SFT on T (>= -2)", per_seed("selfplay_2", "sft_template", "T")))
print("\nEvery Stage 2 row against template SFT, G / T / U:")
for label, key in run.ROWS[3:]:
    print(line(f"{label} G", per_seed(key, "sft_template")))
    print(line("    T", per_seed(key, "sft_template", "T")) + "\n" + line("    U", per_seed(key, "sft_template", "U")))
print("\nMechanism (round 1), per seed:")
for s in seeds:
    m = everything[s]["mechanism"]
    print(f"  seed {s}: located first wrong {100 * m['located_is_first_wrong']:.1f}% (chance {100 * m['chance']:.1f}), "
          f"corrections right {100 * m['corrections_right']:.1f}% "
          f"vs fresh {100 * m['fresh_sample_right_after_a_wrong_one']:.1f}%, "
          f"chosen all steps right {100 * m['chosen_all_steps_right']:.1f}% of {m['chosen']}")
for s in seeds:
    if everything[s].get("gates"):
        gates = everything[s]["gates"]
        c, h, pc = gates["stage1_converged"], gates["G_headroom"], gates["positive_control"]
        verdict = {True: "pass", False: "FAIL"}
        longer = "by bound" if c["by_bound"] else f"{100 * c['dev_T_longer']:.1f} at {c['longer_steps']} steps"
        print(f"  seed {s} gates: converged {verdict[c['pass']]} (dev T {100 * c['dev_T']:.1f}, {longer}); "
              f"headroom {verdict[h['pass']]} (dev G {100 * h['dev_G']:.1f}, pass@1 {100 * h['pass@1']:.1f}, "
              f"pass@4 {100 * h['pass@4']:.1f}); control {verdict[pc['pass']]} (gain {100 * pc['gain']:+.1f}); "
              f"lr rule {gates['dpo_lr_rule']}")
