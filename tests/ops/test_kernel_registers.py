"""benchmarks/kernel_registers.py (offline sm_90a compiles of the chunk kernels, no GPU): every kernel it names
compiles with its launch defaults and its resource line is read back, so a kernel's changed signature cannot leave
the tool broken. Run as its own process: the tests' Triton interpreter (TRITON_INTERPRET=1) cannot compile."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kernel", ["grad_wy", "state_fwd", "state_bwd"])
def test_each_kernel_compiles_for_hopper_and_reports_its_registers(kernel):
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    if not (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--kernels", kernel,
                             "--modes", "efla", "--gated", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"  {kernel} ("), line
    registers, stack = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+)", line).groups())
    assert 0 < registers <= 255 and stack >= 0
