"""Probe after probe_g_multi.py (miniature/README.md; rule written before it ran): is dev G set by SFT's batch order?

probe_g_multi.py's all-多选 G put template SFT's dev G at 9.3 / 20.7 / 78.7 on seeds 0 / 1 / 2, and seed 0's 多选
questions moved from 35.8 (run 5, pass@1) to 9.6 between two Stage 1 runs whose data differ only in row order, at
most 15 questions and the temperature the critique data was sampled at. This reruns probe_g_multi's seed 0 Stage 1
part 2 (same part-1 checkpoint, same data file, same 4,000 steps and lr) with sft.py's --seed 1000 instead of 0, which
changes only the order of the batches, then evaluates it on the same dev split. About 13 minutes.

Rule: if dev G moves by 10 points or more from 9.3 (about 4 binomial standard errors at n = 300), batch order alone
moves G by more than the headroom window can absorb, and the next testbed change is to make Stage 1's G skill
reliable across training runs before choosing G's question mix; if it moves by less, order is not the cause, and the
spread between runs comes from what did differ (the critique data, the exam draw).

    PYTHONPATH=. python miniature/results/probe_sft_order.py /work/runs/probe_g_multi/seed_0     # from the repo root
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402

work = Path(sys.argv[1])
b = dataclasses.replace(R.Budget(), g_type_weights=(0, 0, 1), temperature=1.0, top_p=1.0)  # probe_g_multi's budget
stage = R.Stages(work)
early = stage.done["sft_early"]["checkpoint"]
run = stage("sft_template_order1000", lambda: R.sft(
    work, "sft_template_order1000", ["--model", early], work / "stage1_part2.jsonl", b.sft_steps - b.early_steps,
    b.sft_lr, b.batch, b.cot_micro, 1000))
dev = stage("dev_sft_template_order1000", lambda: R.evaluate(
    work, "sft_template_order1000", run["checkpoint"], b, "dev"))
base = stage.done["dev_sft_template"]
result = {key: {"dev_G": d["G"], "dev_T": d["T"], "groups": d["groups"]}
          for key, d in (("sft seed 0 (probe_g_multi)", base), ("sft seed 1000", dev))}
result["moved_by"] = dev["G"] - base["G"]
result["rule"] = "order moves G by >= 10 points" if abs(result["moved_by"]) >= 0.10 else "order moves G by < 10"
print(json.dumps(result, indent=1, ensure_ascii=False))
