"""Shared test setup: the repository root on sys.path, so plain `pytest` imports the flat scripts too."""
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # ../shared: real tokenizer and data; absent in a fresh clone, tests then skip
sys.path.insert(0, str(ROOT))

# A job started in the background by a shell without job control (`cmd &` in a script, nohup, some CI runners)
# inherits SIGINT ignored, and an exec'd child keeps an ignored signal, so the scripts the Ctrl-C tests start would
# ignore the SIGINT they are sent and the tests would hang for their 60 s timeout. A handler (unlike SIG_IGN) is reset
# to the default on exec, so with one here every child starts as it would from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
