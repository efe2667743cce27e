"""Probe before run 5: does Stage 1 with reading questions teach the checks to read the recited entry, and does that
open G's headroom? Seed 0, the full budget with Budget.reading_questions = 600 (exam.reading_question: fresh
diseases whose entries the stem states, so no memory can supply a check). It runs run.py's own stages (same names,
same folder), so `run.py --out <parent> --gates` then resumes from them: the exam, pretraining, Stage 1, template
SFT's dev evaluation and its dev-G samples (pass@k), then the reading probe (probe_reads_own_line.py).

The rule, fixed before it ran: adopt the reading questions for run 5 if template SFT's dev G is at least 3 points
over run 4's 28.0 and its dev T at least 95.0 (run 4's 97.0 minus the 2 points the issue allows on T); otherwise
drop them and say so. The headroom gate's verdict is reported either way, not relaxed.

    PYTHONPATH=. python miniature/results/probe_reading_stage1.py /work/runs/run5     # from the repo root
"""
import json
import subprocess
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402
import teacher  # noqa: E402

out, b, seed = Path(sys.argv[1]), R.Budget(), 0
work = out / f"seed_{seed}"
work.mkdir(parents=True, exist_ok=True)
(out / "budget.json").write_text(json.dumps(R.dataclasses.asdict(b), indent=1) + "\n")
stage = R.Stages(work)
kb, pre = R.prepare(work, stage, b, seed)
server, url, _ = teacher.serve(kb)
try:
    early, data, t = R.stage1(work, stage, b, seed, pre, url)
finally:
    server.shutdown()
dev = stage("dev_sft_template", lambda: R.evaluate(work, "sft_template", t, b, "dev"))
stage("dev_samples", lambda: R.selfplay(work, "dev_samples", t, work / "data" / "dev_G.csv", b, seed, "--sources",
                                        "sample", samples=b.pass_k) or {})
pass1, passk = R.pass_at_k(work, "dev_samples")
reads = json.loads(subprocess.run([sys.executable, "miniature/results/probe_reads_own_line.py", str(work)],
                                  check=True, capture_output=True, text=True).stdout)
result = {"dev_G": dev["G"], "dev_T": dev["T"], "pass@1": pass1, f"pass@{b.pass_k}": passk,
          "adopt": dev["G"] >= 0.28 + 0.03 - 1e-9 and dev["T"] >= 0.95 - 1e-9, "reads_own_line": reads,
          "seconds": {k: v["seconds"] for k, v in stage.done.items()}}
print(json.dumps(result, ensure_ascii=False, indent=1))
(Path(__file__).parent / "probe_reading_stage1_seed0.json").write_text(json.dumps(result, ensure_ascii=False,
                                                                                   indent=1) + "\n")
