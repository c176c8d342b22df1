"""Registers, spills and instruction counts of the chunk kernels, compiled offline for Hopper (no GPU needed).

    python benchmarks/kernel_registers.py [--kernels wy_fwd grad_wy state_fwd state_bwd out grad_qk]
                                          [--modes efla delta] [--gated 0 1] [--bv 64] [--warps 8] [--stages 2]
                                          [--head-dim 64]

Compiles each kernel (bf16 inputs, K = V = 128 or --head-dim, the WY kernel as the training forward runs it, inverting
and storing T, the gradient pass loading T: the settings of a training step; --bv / --warps / --stages override the
launch defaults of ``efla/ops/triton/launch.py``) for sm_90a with the installed Triton and its bundled ptxas, and prints
what ``cuobjdump`` reads from the binary: registers per thread, STACK (the bytes per thread spilled to local memory) and
the number of SASS instructions. The WY and gradient kernels are compiled in both modes: EFLA's step size is per-row
math beside the same products, so EFLA's count far above delta's means that math runs in a layout where every thread
computes every row. A kernel at 255 registers with a large stack waits on local-memory traffic, and in the sequential
state passes that wait is on the critical path of every chunk; the count is exact and the same on every machine with the
same Triton, so a change that should relieve register pressure can be checked here before it is timed on a GPU (install
the GPU's Triton version for numbers that match it: ``pip install --target DIR triton==X`` and put DIR first on
PYTHONPATH).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from efla.ops.triton import launch
from efla.ops.triton.chunk_bwd import _grad_qk_kernel, _grad_wy_kernel, _state_bwd_kernel
from efla.ops.triton.chunk_fwd import _out_kernel, _state_fwd_kernel
from efla.ops.triton.wy import _wy_fwd_kernel

KERNELS = {"wy_fwd": _wy_fwd_kernel, "grad_wy": _grad_wy_kernel, "state_fwd": _state_fwd_kernel,
           "state_bwd": _state_bwd_kernel, "out": _out_kernel, "grad_qk": _grad_qk_kernel}
MODAL = ("wy_fwd", "grad_wy")  # the kernels that compute EFLA's step size; the state passes do not depend on the mode
# bf16 tensors; every other pointer is float32 (states of float32 passes, beta, g, scratch) or int32 (chunk maps)
_INPUT_DTYPE = {"q", "k", "v", "w", "u0", "u", "t", "h", "o", "do", "du", "dh", "t_in", "dq", "dk_part", "dk", "dv"}
_INT_POINTERS = {"chunk_seq", "chunk_t0", "cu_seqlens", "chunk_first"}
_FLAGS_OFF = ("HAS_H0", "STORE_HT", "HAS_DHT", "STORE_DH0", "KS_IN_LOOP")
_FULL_GPU = 1 << 20  # (sequence, head) pairs: the state pass as a training batch launches it, programs to spare


def resource_usage(kernel: str, efla: bool, gated: bool, bv: int, warps: int, stages: int, dim: int = 128) -> str:
    """cuobjdump's resource line (REG, STACK, SHARED) of one compiled configuration and its SASS instruction count."""
    fn = KERNELS[kernel]
    forward = kernel == "wy_fwd"
    constants = {"K": dim, "V": dim, "BK": 64, "BV": bv, "EFLA": efla, "GATED": gated, "LOAD_T": not forward,
                 "STORE_T": forward, "PREC": "tf32",
                 "OUT": launch.output_in_state_pass(dim, dim, 2, sequences_x_heads=_FULL_GPU),
                 **dict.fromkeys(_FLAGS_OFF, False)}
    constants = {name: value for name, value in constants.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name == "H":
            signature[name] = "i32"
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "*i32" if name in _INT_POINTERS else "*bf16" if name in _INPUT_DTYPE else "*fp32"
    source = ASTSource(fn=fn, signature=signature,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(compiled.asm["cubin"])
        binary.flush()
        report = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", binary.name],
                                capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", binary.name],
                              capture_output=True, text=True, check=True).stdout
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, flags=re.MULTILINE))
    return " ".join(report.strip().splitlines()[-1].split()[:3]) + f" INSTRUCTIONS:{instructions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    parser.add_argument("--modes", nargs="+", default=["efla", "delta"], choices=("efla", "delta"))
    parser.add_argument("--gated", nargs="+", type=int, default=[0, 1], choices=(0, 1))
    parser.add_argument("--bv", type=int, default=None, help="V-block (default: the launch default at K = V)")
    parser.add_argument("--warps", type=int, default=None, help="warps (default: the launch default)")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: the launch default)")
    parser.add_argument("--head-dim", type=int, default=128, choices=(64, 128), help="K = V (default 128)")
    args = parser.parse_args()
    for flag in ("bv", "warps", "stages"):
        value = getattr(args, flag)
        if value is not None and (value < 1 or (flag != "stages" and value & (value - 1))):
            parser.error(f"--{flag} must be a positive{'' if flag == 'stages' else ' power of two'} (got {value})")
    dim = args.head_dim
    print(f"bf16, K = V = {dim}, sm_90a, Triton {triton.__version__}")
    for kernel in args.kernels:
        modes = args.modes if kernel in MODAL else args.modes[:1]
        for mode in modes:
            for gated in args.gated:
                chosen = launch.launch(kernel, dim, dim, 2, gated=bool(gated))
                bv, warps, stages = (args.bv or chosen.bv, args.warps or chosen.warps, args.stages or chosen.stages)
                try:
                    usage = resource_usage(kernel, mode == "efla", bool(gated), bv, warps, stages, dim)
                except Exception as err:  # Triton raises several types (out of shared memory, bad layouts)
                    usage = f"does not compile: {type(err).__name__}: {str(err).strip().splitlines()[-1][:200]}"
                label = f"{kernel} ({mode if kernel in MODAL else 'either mode'}{', gated' if gated else ''})"
                print(f"  {label}, V-block {bv}, {warps} warps, {stages} stages: {usage}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
