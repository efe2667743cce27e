"""A stand-in for dpo.py in tests/test_selfplay.py's rounds driver test: it takes dpo.py's command line, logs it,
and writes a complete checkpoint folder (the input model, unchanged) the way sft.save_checkpoint names one.
FAKE_DPO_LOG: a JSONL file to append each call to. FAKE_DPO_FAIL: a file; if it exists when a round_2 run starts,
it is removed and the run fails (a DPO run that dies). FAKE_DPO_HANG: a file to append this process's PID to before
hanging (a DPO run still training when selfplay is killed)."""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import load, save  # noqa: E402

parser = argparse.ArgumentParser()
for flag in ("--model", "--tokenizer", "--data", "--out"):
    parser.add_argument(flag, required=True)
parser.add_argument("--resume", action="store_true")
args, extra = parser.parse_known_args()
with open(os.environ["FAKE_DPO_LOG"], "a") as f:
    f.write(json.dumps({**vars(args), "extra": extra, "world_size": os.environ.get("WORLD_SIZE")}) + "\n")
if os.environ.get("FAKE_DPO_HANG"):
    with open(os.environ["FAKE_DPO_HANG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(600)
fail = Path(os.environ.get("FAKE_DPO_FAIL", "/nonexistent"))
if fail.exists() and "round_2" in args.out:
    fail.unlink()
    sys.exit(1)
step = Path(args.out) / "step-000003"
if os.environ.get("RANK", "0") != "0":
    sys.exit(0)
save(load(args.model), step)
(step / "trainer_state.json").write_text(json.dumps({"step": 3}))
