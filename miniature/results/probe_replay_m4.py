"""Probe before run 4 (miniature/README.md; settings fixed before any result was seen): on one seed folder's template
SFT (seed 0, Budget as committed), does (1) m = 4 corrections per wrong sample give self-correction enough pairs, and
(2) at that many steps, does the teacher's positive control gain >= 3 on dev G, with and without `dpo.py --replay`
(Stage 1's part-1 data: T trajectories + knowledge snippets, weight 1) holding dev T within 2 points?

Decision rules, written before running: adopt m = 4 if its round 1 makes >= 2.5x run 3's 46 pairs; adopt --replay if
the lr rule (best dev G among lrs with dev T >= template dev T - 2; tie -> smaller; none -> smallest) applied to the
replay arm gives a control gain >= 3 and the no-replay arm does not (or gives less).

    PYTHONPATH=. python miniature/results/probe_replay_m4.py /work/runs/base/seed_0     # from the repo root
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, "miniature")
import run as R  # noqa: E402
import teacher  # noqa: E402

work = Path(sys.argv[1])
stages = json.loads((work / "stages.json").read_text())
t = stages["sft_template"]["checkpoint"]
b = dataclasses.replace(R.Budget(), corrections=4)
stage = R.Stages(work)
result = {"template": stage("dev_sft_template", lambda: R.evaluate(work, "sft_template", t, b, "dev"))}
m4 = stage("probe_selfplay_m4", lambda: R.self_correction(work, "selfplay_m4", 1, t, b, 0))
kb = json.loads((work / "data" / "kb.json").read_text(encoding="utf-8"))
server, url, _ = teacher.serve(kb)
try:
    stage("probe_teacher_pairs_m4", lambda: R.teacher_pairs(work, url, "selfplay_m4"))
finally:
    server.shutdown()
result["selfplay_m4"] = {k: m4[k] for k in ("pairs", "steps", "generated_tokens", "correction_success_rate",
                                            "seconds")}
result["dev_selfplay_m4"] = stage("dev_probe_selfplay_m4", lambda: R.evaluate(work, "probe_selfplay_m4",
                                                                                m4["checkpoint"], b, "dev"))
steps = str(m4["steps"])
for replay in (False, True):
    for lr in ("1e-5", "5e-5", "2e-4"):
        key = f"probe_teacher_s{steps}_lr{lr}" + ("_replay" if replay else "")
        extra = ["--steps", steps, "--lr", lr] + (["--replay", work / "stage1_part1.jsonl"] if replay else [])
        stage(key, lambda: R.dpo(work, key, t, work / "teacher_pairs.jsonl", b, 0, extra))
        result[key] = stage(f"dev_{key}", lambda: R.evaluate(work, key, stage.done[key]["checkpoint"], b, "dev"))
summary = {k: {x: v.get(x) for x in ("G", "T", "pairs", "steps", "seconds") if x in v} for k, v in result.items()}
(work / "probe_replay_m4.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary, indent=1))
