"""Probe after run 6 (miniature/README.md; rule written before it ran): the correction, or the rejected side?

Run 6's round 2 is level with Iterative RPO (+0.2 +- 0.7 on test G), and round 1 with the teacher's corrections. The
three DPO rows differ in two things at once: which wrong samples they reject and what they prefer to them. Two rows
here keep self-correction round 1's rejected side exactly (the student's own wrong samples, in the pairs' order) and
differ only in the chosen side:
  - own right: the student's own right sample of the same question in place of its correction: the first, in sample
    order, of round 1's own samples of that question, then of the baseline's (RFT's filter: right, finished, well
    formed, follows its own marks);
  - correction: the pair as self-correction made it.
Both keep only the pairs whose question has such a sample (the rest are counted), and train as selfplay_1 and
dpo_teacher do: Budget.dpo's flags and selfplay_1's optimizer steps. Test on test, paired per question.

Rule: on each seed, the paired difference on test G of own right minus correction, with its 95% interval. If the
interval excludes 0 in the correction's favour on both seeds, the correction's content matters; if it includes 0 or
favours the own samples on both, the critique adds nothing over the student's own right answers on the same wrong
samples; otherwise two seeds do not settle it. Also counted: how many chosen replies of each kind equal the teacher's
trajectory byte for byte, and how many self-correction pairs have no own right sample to stand in (questions where
only a correction could supply the chosen side). Added after it ran, outside the rule: the correction subset against
self-correction round 1 itself (what dropping those pairs cost at the same steps), and how many chosen replies have
every step right (teacher.steps_right: most that differ from the teacher's byte for byte differ only in the summary
after </think>).

    PYTHONPATH=. python miniature/results/probe_chosen_side.py /work/runs/run6 1,2     # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402
import selfplay as S  # noqa: E402
import teacher  # noqa: E402
import templates as T  # noqa: E402


def own_right_samples(work):
    """{question id: [texts of its own right samples]}, round 1's samples first, then the baseline's."""
    found = {}
    for name in ("selfplay", "baseline_samples"):
        for record in T.read_jsonl(work / name / "round_1" / "samples.jsonl"):
            found.setdefault(record["id"], []).extend(
                s["text"] for s in record["samples"]
                if s["right"] and s["finished"] and s["well_formed"] and teacher.follows_marks(s["text"]))
    return found


def own_right_pairs(work):
    """Round 1's pairs with an own right sample as chosen, the same pairs as self-correction made them, the pairs
    whose question has no own right sample (only a correction could make them), and counts."""
    rows = {row["id"]: row for row in T.load_cmexam(work / "data" / "stage2.csv")}
    kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
    own = own_right_samples(work)
    pairs, kept, only, canonical = [], [], [], {"correction": 0, "own": 0}
    every_step_right = {"correction, all pairs": 0, "correction, kept pairs": 0, "own": 0}
    for pair in T.read_jsonl(work / "selfplay" / "round_1" / "pairs.jsonl"):
        row = rows[pair["id"]]
        reference = teacher.answer_text(kb, teacher.parse_question(T.format_question(row)))
        canonical["correction"] += pair["chosen"][0]["content"] == reference
        correction_right = teacher.steps_right(pair["chosen"][0]["content"], reference)
        every_step_right["correction, all pairs"] += correction_right
        if not own.get(pair["id"]):
            only.append(pair)
            continue
        chosen = own[pair["id"]][0]
        canonical["own"] += chosen == reference
        every_step_right["correction, kept pairs"] += correction_right
        every_step_right["own"] += teacher.steps_right(chosen, reference)
        kept.append(pair)
        pairs.append(S.pair_record(row, chosen, pair["rejected"][0]["content"], round=1, sample=pair["sample"],
                                   source="own_right", hint=False, answer=row["answer"],
                                   rejected_answer=pair["rejected_answer"]))
    return pairs, kept, only, {"pairs": len(pairs), "dropped_no_own_right_sample": len(only),
                               "chosen_equal_to_teacher_trajectory": canonical,
                               "chosen_with_every_step_right (after the run)": every_step_right}


def train_and_test(work, seed, rows):
    """Each (key, pairs) in rows trained as selfplay_1 and dpo_teacher are (Budget.dpo's flags, run 6's budget,
    selfplay_1's optimizer steps) from template SFT, then tested: (the run's stages, {key: test evaluation})."""
    b = R.Budget(**json.loads((work.parent / "budget.json").read_text()))
    stage = R.Stages(work)
    steps, evals = ["--steps", stage.done["selfplay_1"]["steps"]], {}
    for key, pairs in rows:
        T.write_jsonl(work / f"{key}.jsonl", pairs)
        trained = stage(key, lambda: R.dpo(work, key, stage.done["sft_template"]["checkpoint"],
                                           work / f"{key}.jsonl", b, seed, steps))
        evals[key] = stage(f"eval_{key}", lambda: R.evaluate(work, key, trained["checkpoint"], b))
    return stage, evals


def main():
    result = {}
    for seed in [int(s) for s in sys.argv[2].split(",")]:
        work = Path(sys.argv[1]) / f"seed_{seed}"
        own, kept, _, counts = own_right_pairs(work)
        stage, evals = train_and_test(work, seed, (("dpo_own_right", own), ("dpo_correction_subset", kept)))
        counts.update({f"{key}_steps": stage.done[key]["steps"] for key in evals})
        result[seed] = {**counts, "self_correction_pairs": stage.done["selfplay_1"]["pairs"],
                        "own right vs correction": {x: R.paired_difference(evals["dpo_correction_subset"],
                                                                           evals["dpo_own_right"], x) for x in "GTU"},
                        "correction subset vs selfplay_1 (after the run)": {
                            x: R.paired_difference(stage.done["eval_selfplay_1"], evals["dpo_correction_subset"], x)
                            for x in "GTU"},
                        **{f"{key} vs sft_template": {x: R.paired_difference(stage.done["eval_sft_template"], ev, x)
                                                      for x in "GTU"} for key, ev in evals.items()}}
        d = result[seed]["own right vs correction"]["G"]
        print(f"seed {seed}: own right minus correction on test G {100 * d['diff']:+.1f} "
              f"(95% {100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f}), {counts}", flush=True)
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
