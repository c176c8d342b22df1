"""Process groups of the context-parallel tests: ``world`` CPU processes over gloo on 127.0.0.1, each reading the
inputs from ``folder/inputs.pt`` and writing its results to ``folder/rank{R}.pt``, waited for with a deadline so that
a hung collective fails the test."""

from __future__ import annotations

import contextlib
import datetime
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float) -> Iterator[None]:
    """This process joined to the gloo group on 127.0.0.1:port (one thread), left when the block ends."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_ranks(worker: Callable, world: int, folder: Path, timeout_s: float) -> list[dict]:
    """Spawn ``worker(rank, world, port, str(folder))`` on ``world`` processes; fail the test if they have not all
    finished within ``timeout_s``; return what each rank saved to ``folder/rank{R}.pt``."""
    context = mp.spawn(worker, args=(world, free_port(), str(folder)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world}-process group did not finish within {timeout_s} s")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def run_seeded(worker: Callable, world: int, folder: Path, timeout_s: float,
               make_inputs: Callable[[torch.Generator], dict]) -> dict:
    """Fresh random inputs ``make_inputs(generator)`` from a new seed, saved to ``folder/inputs.pt``; then
    ``run_ranks``. Returns {"inputs", "ranks", "seed"}: the seed goes into failure messages, to rerun a case."""
    seed = random.SystemRandom().randrange(2**31)
    inputs = make_inputs(torch.Generator().manual_seed(seed))
    torch.save(inputs, folder / "inputs.pt")
    return {"inputs": inputs, "ranks": run_ranks(worker, world, folder, timeout_s), "seed": seed}
