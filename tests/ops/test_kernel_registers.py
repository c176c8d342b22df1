"""benchmarks/kernel_registers.py (offline sm_90a compiles of the chunk kernels, no GPU): every kernel it names
compiles with its launch defaults and its resource line is read back, so a kernel's changed signature cannot leave
the tool broken; and EFLA's step size does not multiply the WY kernels' instructions (the math of 64 rows done by
every thread, as a row sum's layout once made it). Run as its own process: the tests' Triton interpreter
(TRITON_INTERPRET=1) cannot compile."""

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


def _tool(*args: str) -> list[str]:
    """The tool's output lines, one per compiled configuration (skips where the wheel cannot compile for CUDA)."""
    triton_dir = Path(importlib.util.find_spec("triton").origin).parent
    if not (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), *args],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[1:]


@pytest.mark.parametrize("kernel", ["wy_fwd", "grad_wy", "state_fwd", "state_bwd", "out", "grad_qk"])
def test_each_kernel_compiles_for_hopper_and_reports_its_registers(kernel):
    (line,) = _tool("--kernels", kernel, "--modes", "efla", "--gated", "1")
    assert line.startswith(f"  {kernel} ("), line
    registers, stack, instructions = (int(x) for x in re.search(
        r"REG:(\d+) STACK:(\d+) .*INSTRUCTIONS:(\d+)", line).groups())
    assert 0 < registers <= 255 and stack >= 0 and instructions > 100


def test_efla_step_size_costs_few_instructions():
    """EFLA's WY kernels differ from delta mode's by per-row step-size math beside the same tensor-core products, so
    their instruction counts must stay close. With lambda taken as a row sum over the key tile (K across the threads)
    every thread held all 64 rows and ran that math for each: 2.1x delta's count in the WY kernel and 2.7x in the
    gradient kernel (Triton 3.9, sm_90a), 1.3x at most since lambda comes from the Gram matrix's diagonal."""
    counts = {}
    for line in _tool("--kernels", "wy_fwd", "grad_wy", "--modes", "efla", "delta", "--gated", "0", "1"):
        label = re.match(r"\s+(\S+) \(([^)]*)\)", line).groups()
        counts[label] = int(re.search(r"INSTRUCTIONS:(\d+)", line).group(1))
    assert len(counts) == 8, counts
    for kernel in ("wy_fwd", "grad_wy"):
        for gated in ("", ", gated"):
            efla, delta = counts[(kernel, f"efla{gated}")], counts[(kernel, f"delta{gated}")]
            assert efla <= 1.5 * delta, (kernel, gated, efla, delta)
