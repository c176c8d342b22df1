"""Registers and spills of the gradient kernel through the WY system, compiled offline for Hopper (no GPU needed).

    python benchmarks/kernel_registers.py [--modes efla delta] [--gated 0 1] [--bv 64] [--warps 8] [--stages 2]

Compiles ``_grad_wy_kernel`` (bf16 inputs, K = V = 128, T loaded from the forward, the settings of a training step)
for sm_90a with the installed Triton and its bundled ptxas, and prints what ``cuobjdump --dump-resource-usage`` reads
from the binary: registers per thread and STACK, the bytes per thread spilled to local memory. A kernel at 255
registers with a large stack waits on local-memory traffic; the count is exact and the same on every machine with the
same Triton, so a change that should relieve register pressure can be checked here before it is timed on a GPU
(install the GPU's Triton version for numbers that match it: ``pip install --target DIR triton==X`` and put DIR first
on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from efla.ops.triton.chunk_bwd import _grad_wy_kernel

_INPUT_DTYPE = ("k", "v", "t_in", "du", "h", "dk_part", "dk", "dv")  # bf16 tensors; the others are float32 or int32
_INT_POINTERS = ("chunk_seq", "chunk_t0", "cu_seqlens")


def resource_usage(efla: bool, gated: bool, bv: int, warps: int, stages: int) -> str:
    """cuobjdump's resource line (REG, STACK, SHARED, ...) of one compiled configuration."""
    constants = {"K": 128, "V": 128, "BV": bv, "EFLA": efla, "GATED": gated, "LOAD_T": True, "KS_IN_LOOP": False,
                 "PREC": "tf32"}
    signature = {}
    for name in _grad_wy_kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "H":
            signature[name] = "i32"
        else:
            signature[name] = "*i32" if name in _INT_POINTERS else "*bf16" if name in _INPUT_DTYPE else "*fp32"
    source = ASTSource(fn=_grad_wy_kernel, signature=signature,
                       constexprs={(_grad_wy_kernel.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(compiled.asm["cubin"])
        binary.flush()
        report = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", binary.name],
                                capture_output=True, text=True, check=True).stdout
    return " ".join(report.strip().splitlines()[-1].split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--modes", nargs="+", default=["efla", "delta"], choices=("efla", "delta"))
    parser.add_argument("--gated", nargs="+", type=int, default=[0, 1], choices=(0, 1))
    parser.add_argument("--bv", type=int, default=64, help="V-block (the default launch: 64)")
    parser.add_argument("--warps", type=int, default=8, help="warps (the default launch: 8)")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages (the default launch: 2)")
    args = parser.parse_args()
    print(f"_grad_wy_kernel, bf16, K = V = 128, sm_90a, Triton {triton.__version__}, V-block {args.bv}, "
          f"{args.warps} warps, {args.stages} stages")
    for mode in args.modes:
        for gated in args.gated:
            usage = resource_usage(mode == "efla", bool(gated), args.bv, args.warps, args.stages)
            print(f"  {'gated ' if gated else ''}{mode}: {usage}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
