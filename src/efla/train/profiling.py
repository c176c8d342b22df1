"""Profiling a few training steps with torch.profiler: where a step's time goes, per operator and kernel."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

WARMUP_STEPS = 3  # steps run before profiling starts (kernel compilation, allocator growth, autotuning)


def device_profile(device: torch.device) -> profile:
    """A torch.profiler session recording CPU operators, and CUDA kernels when ``device`` is a GPU."""
    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def operator_table(prof: profile, device: torch.device, rows: int) -> str:
    """The ``rows`` operators of a finished session taking the most self time on ``device`` (GPU, else CPU), with a
    first line saying which time."""
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"operators by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=80)


class StepProfiler:
    """Profiles ``steps`` training steps after ``WARMUP_STEPS`` (counted in this process, so also after a resume) and
    then writes ``profile.txt`` (operators by self device time on GPU, CPU time otherwise, per profiled step) and
    ``profile_trace.json`` (a Chrome / Perfetto trace) into ``out_dir``. Disabled when ``steps`` is 0."""

    def __init__(self, out_dir: Path, steps: int, device: torch.device, enabled: bool = True) -> None:
        self.out_dir, self.steps, self.device = out_dir, steps, device
        self.enabled = enabled and steps > 0
        self.done = 0
        self.active: profile | None = None

    def before_step(self) -> None:
        if self.enabled and self.done == WARMUP_STEPS and self.active is None:
            self.active = device_profile(self.device)
            self.active.__enter__()

    def after_step(self) -> None:
        self.done += 1
        if self.active is not None and self.done == WARMUP_STEPS + self.steps:
            self.finish()

    def finish(self) -> None:
        """Stop profiling (if it runs) and write the files; also called when training ends early."""
        if self.active is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self.active = self.active, None
        prof.__exit__(None, None, None)
        profiled = self.done - WARMUP_STEPS
        (self.out_dir / "profile.txt").write_text(f"{profiled} training step(s) after {WARMUP_STEPS} warm-up steps, "
                                                  f"{operator_table(prof, self.device, 40)}\n")
        prof.export_chrome_trace(str(self.out_dir / "profile_trace.json"))
