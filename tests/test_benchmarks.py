"""benchmarks/gpu_check.py: it must at least start, explain itself, and refuse clearly where there is no GPU."""
import subprocess
import sys

import pytest
import torch

from conftest import ROOT


def test_gpu_check_help_and_clear_refusal_without_cuda():
    script = str(ROOT / "benchmarks" / "gpu_check.py")
    out = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--cpu-smoke" in out.stdout and "SDPA" in out.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run the check itself")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs a CUDA GPU" in out.stderr and "Traceback" not in out.stderr
