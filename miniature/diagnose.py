"""Why do the student's self-corrections succeed or fail? Reads one self-play round and grades every step.

selfplay.py keeps every sample and critique text (samples.jsonl). This compares each wrong sample and each of its
corrections with the teacher's trajectory for the same question (the knowledge base's own answer), line by line:
which steps the sample got wrong, whether the critique named them, whether the corrected solution fixed them, broke
lines that were right, or just copied the wrong answer again.

    python miniature/diagnose.py --run runs/mini/seed_0 [--round 1] [--show 3]
    python miniature/diagnose.py --run runs/mini/seed_0 --copies dev_sft_template   # copy_rates of one evaluation

It reads rounds of the whole-solution rewrite (`selfplay.py --correction rewrite`, the previous design's); run.py's
`mechanism` grades the step corrections of the current design.
"""
import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import teacher  # noqa: E402
import templates as T  # noqa: E402

STEPS = ("提取关键信息", "回忆相关知识", "逐项分析各选项")


def step_lines(text) -> set:
    found = teacher.sections(text)
    return {(s, line) for s in STEPS for line in found.get(s, [])}


def error_kinds(text, reference) -> Counter:
    """Which steps of `text` differ from the reference trajectory (an option line split into its recalled entry and
    its checks), and whether its answer ignores its own marks."""
    ours, ref = teacher.sections(text), teacher.sections(reference)
    kinds = Counter()
    for section in STEPS:
        theirs = ours.get(section, [])
        for i, line in enumerate(ref.get(section, [])):
            if line in theirs:
                continue
            if section != "逐项分析各选项":
                kinds[section] += 1
                continue
            other = theirs[i] if i < len(theirs) else ""
            same_entry = line.partition("；")[0] == other.partition("；")[0]
            kinds["option: checks or mark" if same_entry else "option: recalled entry"] += 1
    if not teacher.follows_marks(text):
        kinds["answer ignores own marks"] += 1
    return kinds


def diagnose(run, round_=1, show=0):
    """(counts, error kinds of the wrong samples, error kinds of those whose corrections were right)."""
    run = Path(run)
    kb = json.loads((run / "data" / "kb.json").read_text(encoding="utf-8"))
    rows = {row["id"]: row for row in T.load_cmexam(run / "data" / "stage2.csv")}
    records = [json.loads(line) for line in
               (run / "selfplay" / f"round_{round_}" / "samples.jsonl").read_text("utf-8").splitlines()]

    n, sample_errors, fixed_errors = Counter(), Counter(), Counter()
    shown = 0
    for record in records:
        row = rows[record["id"]]
        q = teacher.parse_question(T.format_question(row))
        reference = teacher.answer_text(kb, q)
        ref_lines = step_lines(reference)
        for sample in record["samples"]:
            if "text" not in sample:
                raise SystemExit("samples.jsonl has no texts: written by an older selfplay.py")
            sample_lines = step_lines(sample["text"])
            if sample["right"]:  # the contrast: how often a right first answer has right steps
                n["right samples"] += 1
                n["right samples with every step right"] += ref_lines <= sample_lines
            if sample["right"] or "corrections" not in sample:
                continue
            wrong_lines, right_before = ref_lines - sample_lines, ref_lines & sample_lines
            kinds = error_kinds(sample["text"], reference)
            sample_errors.update(kinds)
            n["wrong samples"] += 1
            n["wrong samples: answer follows own marks"] += teacher.follows_marks(sample["text"])
            # the bar a correction must clear: how often simply sampling the question again would have been right
            others = [other["right"] for other in record["samples"] if other is not sample]
            n["wrong samples: another sample right"] += sum(others) / len(others) if others else 0
            n[f"wrong samples: type {row['Question Type']}"] += 1
            for c in sample["corrections"]:
                solution = T.extract_correction(c["text"])
                n["corrections"] += 1
                n["corrections right"] += c["right"]
                n["corrections: no correction mark"] += not solution
                if not solution:
                    continue
                critique = c["text"].split(T.CORRECTION_MARK)[0]
                named = [line.split("有误，应为：", 1)[1] for line in critique.splitlines() if "有误，应为：" in line]
                n["critiques naming >= 1 step"] += bool(named)
                n["critique lines naming a truly wrong step"] += sum(
                    any(line == ref_line for _, ref_line in wrong_lines) for line in named)
                n["critique lines"] += len(named)
                n["corrections: same answer as the wrong sample"] += c["predicted"] == sample["predicted"]
                n["corrections: identical to the wrong sample"] += solution.strip() == sample["text"].strip()
                n["corrections: answer follows own marks"] += teacher.follows_marks(solution)
                now = step_lines(solution)
                n["wrong step lines (in corrected samples)"] += len(wrong_lines)
                n["wrong step lines fixed"] += len(wrong_lines & now)
                n["right step lines"] += len(right_before)
                n["right step lines broken"] += len(right_before - now)
                if c["right"]:
                    fixed_errors.update(kinds)
                    # a right answer is what selfplay.py checks; are the steps that reach it right too?
                    n["corrections right with every step right"] += ref_lines <= now
            if shown < show:
                shown += 1
                print(f"=== {row['id']} gold {row['answer']} sample {sample['predicted']} errors {dict(kinds)}\n"
                      f"{sample['text']}\n--- reference\n{reference}")
                for c in sample["corrections"]:
                    print(f"--- correction ({c['predicted']}, right={c['right']})\n{c['text']}")

    return n, sample_errors, fixed_errors


def copy_rates(predictions, data) -> dict:
    """Per Disease Split, on diagnosis questions: how often a reply copies the question's findings and all five
    option names into its lines, and is right. Issue 11's first gates run: 100% / 100% on T, 17% / 0% on G (the
    student never wrote a G name in a reply, so it could not check a G option)."""
    rows = {row["id"]: row for row in T.load_cmexam(data)}
    n = Counter()
    for p in map(json.loads, Path(predictions).read_text(encoding="utf-8").splitlines()):
        row = rows[p["id"]]
        if row["Question Type"] != "诊断":
            continue
        split, given = row["Disease Split"], re.search(r"患者见(.+?)。", row["question"]).group(1).split("、")
        keys = re.search(r"提取关键信息：(.+?)。", p["output"])
        names = re.findall(r"^([A-E]) (.+?)：", p["output"], re.M)
        n[split, "questions"] += 1
        n[split, "findings copied"] += bool(keys) and set(keys.group(1).split("、")) == set(given)
        n[split, "options copied"] += len(names) == 5 and all(row["options"][x] == name for x, name in names)
        n[split, "right"] += bool(p["correct"])
    return {f"{split} {what}": round(n[split, what] / n[split, "questions"], 3)
            for split, what in n if what != "questions"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="one seed's folder of miniature/run.py (seed_<s>)")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--show", type=int, default=0, help="print this many wrong samples with their critiques")
    parser.add_argument("--copies", metavar="EVAL", help="instead: copy_rates of <run>/eval/EVAL on its data split")
    args = parser.parse_args(argv)
    if args.copies:
        split = args.copies.split("_")[0] if args.copies.startswith("dev_") else "test"
        print(json.dumps(copy_rates(Path(args.run) / "eval" / args.copies / "cot.predictions.jsonl",
                                    Path(args.run) / "data" / f"{split}.csv")))
        return
    n, sample_errors, fixed_errors = diagnose(args.run, args.round, args.show)
    print(f"round {args.round}: {n['wrong samples']} wrong samples sent to critique, {n['corrections']} corrections")
    for key, value in sorted(n.items()):
        print(f"  {key:48} {value}")
    print("wrong step lines in the wrong samples, by kind (and counted once per right correction of their sample):")
    for kind, count in sample_errors.most_common():
        print(f"  {kind:32} {count:5}  per right correction: {fixed_errors[kind]}")


if __name__ == "__main__":
    main()
