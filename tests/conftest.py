"""Shared test setup: the repository root on sys.path, so plain `pytest` imports the flat scripts too."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"  # ../shared: real tokenizer and data; absent in a fresh clone, tests then skip
sys.path.insert(0, str(ROOT))
