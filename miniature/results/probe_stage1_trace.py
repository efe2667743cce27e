"""Analysis for the robustness arm of probe_g_replay.py (a measurement, no rule): where Stage 1's reading skill forms
or goes. Dev R (held-out reading questions), dev T, dev G and dev 多选 at part 1's end and at every part-2
checkpoint kept in the seed's folder (all of them with `--part2-save-every`, else the last only), greedy, each
printed as it is done and written to <seed dir>/stage1_trace.json.

    PYTHONPATH=. python miniature/results/probe_stage1_trace.py /work/runs/robust_s3/seed_3    # from the repo root
"""
import json
import sys
from pathlib import Path

sys.path[:0] = ["miniature", "."]
import run as R  # noqa: E402


def trace(work, checkpoints, b=R.Budget(), tag="trace"):
    """[{step, checkpoint, dev_R, dev_T, dev_G, dev_多选, dev_R_groups}] for each (step, checkpoint); the evaluations
    in work/eval/<split>_<tag>_<step>."""
    out = []
    for step, checkpoint in checkpoints:
        dev, dev_r = (R.evaluate(work, f"{tag}_{step:05d}", checkpoint, b, split) for split in ("dev", "dev_R"))
        out.append({"step": step, "checkpoint": str(checkpoint), "dev_R": dev_r["groups"]["Disease Split=R"],
                    "dev_T": dev["T"], "dev_G": dev["G"], "dev_多选": dev["groups"].get("Question Type=多选"),
                    "dev_R_groups": dev_r["groups"]})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "dev_R_groups"}, ensure_ascii=False), flush=True)
    return out


def kept_part2(folder, b=R.Budget()):
    """[(Stage 1 step, checkpoint)] for the part-2 checkpoints kept in folder, the last (a probe's verdict) first."""
    kept = sorted(folder.glob("step-*"))
    return [(b.early_steps + int(c.name[5:]), c) for c in kept[-1:] + kept[:-1]]


if __name__ == "__main__":
    work = Path(sys.argv[1])
    early = Path(json.loads((work / "stages.json").read_text())["sft_early"]["checkpoint"])
    steps = [(int(early.name[5:]), early)] + sorted(kept_part2(work / "sft_template"))
    (work / "stage1_trace.json").write_text(json.dumps(trace(work, steps), indent=1, ensure_ascii=False) + "\n")
