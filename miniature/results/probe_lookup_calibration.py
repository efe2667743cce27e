"""Calibration after the lookup arm stopped (session 23, a measurement, no rule): how fast does the miniature's
student learn to copy an entry by its name from the context, and does the entry's format or the head size decide it?

The lookup arm's pretraining (probe_g_replay.py, `--pretrain-lookups 4800 --pretrain-steps 750`) left the student
reciting generic findings for a listed name (lookup accuracy 0 of 200 on seeds 1 and 2). Here, from that seed-1
checkpoint or from scratch, sft.py trains on lookup documents alone (32,000 fresh ones, never repeated: 2,000 steps x
16) and the held-out accuracy is read: "exact" (the first recital's whole entry) and "first finding" (its first
finding only; with 2 names, copying either listed entry gets it right about half the time). Formats of a
document with 2 names, e.g. "已知：胆炎：渴、汗、疹；胆瘤：痰、抽。\\n胆瘤：痰、抽\\n胆炎：渴、汗、疹\\n":
colon_comma (that one, the exam's own format), colon (no 、), comma (no ：), none ("胆炎渴汗疹": the name's next
token is the first finding, a plain induction-head copy).

    python miniature/results/probe_lookup_calibration.py write W/seed_1 --out C          # C/f_<format>.jsonl
    python sft.py --model W/seed_1/pretrain/step-000750 --tokenizer W/seed_1/student --data C/f_none.jsonl \\
        --out C/f_none --max-len 256 --steps 2000 --lr 3e-3 --batch-size 16 --micro-batch-size 16 \\
        --save-every 1000 --seed 1 --weight-decay 0.1     # or --init-config C/cfg_h4/config.json: from scratch
    python miniature/results/probe_lookup_calibration.py eval W/seed_1 --format none --checkpoint C/f_none/step-002000

The merged-tokenizer pair (written before either ran, after the 2-name runs above: "none" selects by name by 12,000
steps, the exam's colon_comma does not): is it the two-token key ("胆癌" then "：") that the exam's format asks a
lookup to match? `merged` writes the seed's tokenizer with one added token per name and its "：" ("胆癌："), so the
exam's own text has a one-token key. Both from scratch on the same 128,000 colon_comma documents (f_colon_comma.jsonl
+ 96,000 more), 12,000 steps, read every 3,000: the merged tokenizer, and the seed's own (the control). Predicted:
merged >= 90% exact by 12,000 steps, the control's first finding <= 60%.

    python miniature/results/probe_lookup_calibration.py merged W/seed_1 --out C/tok_merged
    python sft.py --init-config C/tok_merged/config.json --tokenizer C/tok_merged --data C/f_colon_comma_128k.jsonl \
        --out C/merged_scratch --max-len 256 --steps 12000 --lr 3e-3 --batch-size 16 --micro-batch-size 16 \
        --save-every 3000 --keep 0 --seed 1 --weight-decay 0.1
    python miniature/results/probe_lookup_calibration.py eval W/seed_1 --format colon_comma \
        --tokenizer C/tok_merged --checkpoint C/merged_scratch/step-012000

The lookup-first pilot (session 23; written before it ran, after every calibration above). Does a student that
has the lookup before Stage 1 read earlier in it? Seed 1, two folders that share the exam, the tokenizer and the
teacher's trajectories (copied from W), 1 core each:
- pilot_look: the control run above at step 6,000 (the exam's format, 88.5% exact), then 1,000 steps on pretraining's
  800 knowledge copies + 5,600 fresh 1-5-name lookup documents (student.lookup_records, salt "lookup-mix"), as the
  "pretrain" stage;
- pilot_base: the candidate's own pretraining (400 steps on the knowledge copies).
Both then run the candidate's Stage 1 (probe_g_replay.py's department-arm command, part-2 checkpoints every 1,000
steps) and are stopped after part-2 step 3,000; probe_stage1_trace.py reads dev R / dev T at Stage 1 steps 500,
1,500, 2,500, 3,500. This is a pilot on one draw each, to decide whether the full arm is worth a session; it
qualifies nothing. Rule: pilot_look's dev R at step 3,500 >= pilot_base's + 20 -> the next session runs the full
lookup-first arm on seeds 1 and 2 (its rule written then); less -> a pre-formed lookup does not bring the reading
forward on this draw, recorded, and the arm does not run on this evidence. Predicted: pilot_look's dev R >= 50 at
step 2,500; pilot_base's < 35 there (session 22's seed 1: 17.2 at 2,500, 35.8 at 3,500), and the rule's first branch.

(W: the lookup arm's folder, /work/runs/g_look_s1. The 8-name run trained on `student.lookup_records(kb, 32000, 1,
salt="cal8")` and was read by student.lookup_accuracy; the 2-name colon_comma row's model trained on
`lookup_records(kb, 32000, 1, names=2, salt="cal2")` and is read here. cfg_h<h>: the student's config.json with h
heads of dimension 128 / h, h / 2 KV heads.)
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import student  # noqa: E402
import templates as T  # noqa: E402
from exam import FINDINGS, ORGANS, PROCESSES, outside_names  # noqa: E402

FORMATS = {"colon_comma": ("：", "、"), "none": ("", ""), "colon": ("：", ""), "comma": ("", "、")}


def documents(kb, n, fmt, salt, names=2):
    """n (listed line, [(name, entry)] in recital order) of `names` diseases outside kb (an int, or (low, high):
    drawn per document), entries in `fmt`."""
    colon, comma = FORMATS[fmt]
    outside = outside_names(kb)
    rng, out = random.Random(salt), []
    for _ in range(n):
        count = names if isinstance(names, int) else rng.randint(*names)
        entries = {name: sorted(rng.sample(FINDINGS, rng.choice((3, 4))), key=FINDINGS.index)
                   for name in rng.sample(outside, count)}
        listed = "已知：" + "；".join(f"{k}{colon}{comma.join(v)}" for k, v in entries.items()) + "。"
        out.append((listed, [(k, comma.join(entries[k])) for k in rng.sample(list(entries), count)]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("write", "eval", "merged"))
    parser.add_argument("work", help="the lookup arm's seed folder (its kb.json and tokenizer)")
    parser.add_argument("--out", help="write: folder for f_<format>.jsonl")
    parser.add_argument("--format", choices=list(FORMATS))
    parser.add_argument("--checkpoint")
    parser.add_argument("--names", default="2", help="names per document: N, or LOW-HIGH drawn per document")
    parser.add_argument("--n", type=int, default=32000, help="write: documents per format")
    parser.add_argument("--tokenizer", help="eval: a tokenizer folder other than the seed's (merged's)")
    args = parser.parse_args()
    work = Path(args.work)
    kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
    names = student.name_count(args.names)
    tag = "" if names == 2 else f"_{args.names}"  # the 2-name files keep their first names (and salts)
    if args.action == "write":
        for fmt, (colon, _) in FORMATS.items() if not args.format else [(args.format, FORMATS[args.format])]:
            T.write_jsonl(Path(args.out) / f"f_{fmt}{tag}.jsonl",
                          [{"text": listed + "\n" + "".join(f"{k}{colon}{v}\n" for k, v in recited)}
                           for listed, recited in documents(kb, args.n, fmt, f"train-{fmt}{tag}", names)])
        return
    if args.action == "merged":  # the seed's tokenizer + one added token per name and its "：" ("胆癌：")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = student.train_tokenizer(student.corpus(work / "data", seed=kb["config"]["seed"]))
        tokenizer.add_tokens([o + p + "：" for o in ORGANS for p in PROCESSES])
        tokenizer.save(str(out / "tokenizer.json"))
        config = json.loads((work / "student" / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "vocab_size": tokenizer.get_vocab_size()}, indent=1))
        return
    from model import generate, load, load_tokenizer
    colon = FORMATS[args.format][0]
    tokenizer = load_tokenizer(args.tokenizer or work / "student")
    held_out = documents(kb, 200, args.format, f"held-{args.format}{tag}", names)
    prompts = [tokenizer.encode(f"{listed}\n{recited[0][0]}{colon}", add_special_tokens=False).ids
               for listed, recited in held_out]
    outputs = generate(load(args.checkpoint), prompts, 12, temperature=0.0)
    got = [tokenizer.decode(ids).split("\n")[0] for ids in outputs]
    truth = [recited[0][1] for _, recited in held_out]
    print(json.dumps({"format": args.format, "names": args.names, "checkpoint": args.checkpoint,
                      "exact": sum(g == t for g, t in zip(got, truth)) / len(truth),
                      "first finding": sum(g[:1] == t[:1] for g, t in zip(got, truth)) / len(truth)},
                     ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
