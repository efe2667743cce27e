"""Probe after run 3 (miniature/README.md): teacher-corrected DPO on ALL of a seed folder's teacher pairs at
Budget.dpo (no --steps cap), evaluated on dev. Expects run 3's seed folder at /work/runs/gates3/seed_0; run from the
repo root: PYTHONPATH=. python miniature/results/probe_dpo_teacher_full.py"""
import sys, json
from pathlib import Path
sys.path.insert(0, "miniature")
import run as R
b = R.Budget()
work = Path("/work/runs/gates3/seed_0")
t = json.loads((work / "stages.json").read_text())["sft_template"]["checkpoint"]
res = R.dpo(work, "probe_dpo_teacher_full", t, work / "teacher_pairs.jsonl", b, 0)
ev = R.evaluate(work, "probe_dpo_teacher_full", res["checkpoint"], b, "dev")
print(json.dumps({"steps": res["steps"], "dev_G": ev["G"], "dev_T": ev["T"]}))
