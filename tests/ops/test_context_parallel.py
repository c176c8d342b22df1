"""``efla_attention_cp`` against the single-process ``efla_attention`` on the whole sequence: gloo on the CPU with 2
and 4 spawned processes, float64, fresh random inputs; outputs, final states and every gradient to 1e-10 (relative).

Each process group runs all its cases in one spawn (starting processes is the slow part). A rank's loss reads its
outputs and the final state with its own weights; the reference loss is their sum, so the initial state's gradient
is the sum of the ranks' (``efla_attention_cp``'s documented semantics).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo_group import gloo_group, run_seeded

from efla.ops import efla_attention
from efla.ops.context_parallel import efla_attention_cp

H, K, V = 2, 8, 16
CHUNK = 16
TIMEOUT_S = 240
TOLERANCE = 1e-10


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: the shard lengths fix the world size; offsets (packed documents, B = 1) or B sequences."""

    name: str
    lengths: tuple[int, ...]
    mode: str = "efla"
    gated: bool = True
    backend: str = "torch"
    initial_state: bool = True
    offsets: tuple[int, ...] | None = None
    batch: int = 2
    final_state: bool = True

    @property
    def world(self) -> int:
        return len(self.lengths)


def _modes(prefix: str, lengths: tuple[int, ...], **kwargs) -> list[Case]:
    return [Case(f"{prefix}-{mode}-{'gated' if gated else 'plain'}", lengths, mode, gated, **kwargs)
            for mode in ("efla", "delta") for gated in (True, False)]


# world 4 packed: document 0 inside rank 0; document 1 over ranks 0, 1 and 2; document 2 inside rank 2, ending at the
# boundary of ranks 2 and 3; document 3 empty at that boundary; document 4 the whole of rank 3.
PACKED_4 = {"lengths": (40, 55, 30, 45), "offsets": (0, 25, 110, 125, 125, 170)}
CASES = [
    *_modes("sequences-2", (37, 70)),
    Case("sequences-2-recurrent", (23, 30), backend="recurrent", initial_state=False),
    Case("packed-2-crossing", (50, 81), offsets=(0, 30, 70, 70, 131)),
    Case("packed-2-aligned", (70, 61), mode="delta", gated=False, offsets=(0, 30, 70, 131)),
    Case("sequences-2-no-final-state", (45, 19), final_state=False),
    *_modes("sequences-4-uneven-with-empty-shard", (50, 0, 81, 13), initial_state=False),
    Case("sequences-4-recurrent", (11, 20, 0, 17), mode="delta", backend="recurrent"),
    *_modes("packed-4", PACKED_4["lengths"], offsets=PACKED_4["offsets"]),
    Case("packed-4-no-initial-state", PACKED_4["lengths"], gated=False, initial_state=False,
         offsets=PACKED_4["offsets"]),
    Case("packed-4-empty-shards", (0, 60, 0, 47), offsets=(0, 10, 60, 100, 107)),
    Case("sequences-4-no-final-state", (30, 0, 41, 20), final_state=False),
    Case("packed-4-no-final-state", PACKED_4["lengths"], mode="delta", offsets=PACKED_4["offsets"], final_state=False),
]


def _inputs(case: Case, generator: torch.Generator) -> dict[str, torch.Tensor | None]:
    """Fresh float64 inputs of the whole sequence, and the loss weights: w_o for the outputs, w_final[r] for rank r's
    use of the final state."""
    B = 1 if case.offsets else case.batch
    T = sum(case.lengths)
    N = len(case.offsets) - 1 if case.offsets else B

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return {
        "q": randn(B, T, H, K), "k": randn(B, T, H, K) / K ** 0.5, "v": randn(B, T, H, V),
        "beta": 2 * torch.rand(B, T, H, generator=generator, dtype=torch.float64),
        "g": -0.5 * torch.nn.functional.softplus(randn(B, T, H)) if case.gated else None,
        "initial_state": randn(N, H, K, V) if case.initial_state else None,
        "cu_seqlens": torch.tensor(case.offsets) if case.offsets else None,
        "w_o": randn(B, T, H, V), "w_final": randn(case.world, N, H, K, V),
    }


LEAVES = ("q", "k", "v", "beta", "g", "initial_state")


def _reference(case: Case, x: dict) -> dict[str, torch.Tensor]:
    """The single-process run: outputs, final state and the gradients of the summed loss (of the outputs alone
    without the final state)."""
    leaves = {name: x[name].clone().requires_grad_() for name in LEAVES if x[name] is not None}
    o, final = efla_attention(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves.get("g"),
                              initial_state=leaves.get("initial_state"), output_final_state=True,
                              cu_seqlens=x["cu_seqlens"], mode=case.mode, backend=case.backend, chunk_size=CHUNK)
    loss = (o * x["w_o"]).sum()
    (loss + (final * x["w_final"].sum(0)).sum() if case.final_state else loss).backward()
    return {"o": o.detach(), "final": final.detach(), **{f"d{name}": leaf.grad for name, leaf in leaves.items()}}


def _rank_run(case: Case, x: dict, rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part: its shard of every per-token tensor, the same initial state and cu_seqlens."""
    start = sum(case.lengths[:rank])
    shard = slice(start, start + case.lengths[rank])
    leaves = {name: (x[name] if name == "initial_state" else x[name][:, shard]).clone().requires_grad_()
              for name in LEAVES if x[name] is not None}
    o, final = efla_attention_cp(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], g=leaves.get("g"),
                                 initial_state=leaves.get("initial_state"), output_final_state=case.final_state,
                                 cu_seqlens=x["cu_seqlens"], mode=case.mode, backend=case.backend, chunk_size=CHUNK)
    assert (final is None) == (not case.final_state)
    loss = (o * x["w_o"][:, shard]).sum()
    (loss + (final * x["w_final"][rank]).sum() if case.final_state else loss).backward()
    grads = {f"d{name}": torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for name, leaf in leaves.items()}
    return {"o": o.detach(), "final": final.detach() if case.final_state else None, **grads}


def _errors(rank: int) -> list[str]:
    """The one-line errors of inconsistent shards (every rank raises the same, so none waits on the others)."""
    messages = []
    q = torch.randn(1, 5 + rank, H, K, dtype=torch.float64)
    v = torch.randn(1, 5 + rank, H, V, dtype=torch.float64)
    beta = torch.rand(1, 5 + rank, H, dtype=torch.float64)
    for cu_seqlens, key_width in ((torch.tensor([0, 3, 12]), K), (None, K + rank)):
        q_r = q[..., :key_width] if key_width <= K else torch.cat([q, q[..., :key_width - K]], -1)
        try:
            efla_attention_cp(q_r, q_r, v, beta, cu_seqlens=cu_seqlens, backend="torch")
        except ValueError as error:
            messages.append(str(error))
    return messages


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    with gloo_group(rank, world, port, TIMEOUT_S):
        inputs = torch.load(Path(folder) / "inputs.pt")
        results = {case.name: _rank_run(case, inputs[case.name], rank) for case in CASES if case.name in inputs}
        results["errors"] = _errors(rank) if world == 2 else []
        torch.save(results, Path(folder) / f"rank{rank}.pt")



def _world_inputs(world: int, generator: torch.Generator) -> dict:
    """The inputs of this world size's cases."""
    return {case.name: _inputs(case, generator) for case in CASES if case.world == world}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[int, dict]:
    return {world: run_seeded(_worker, world, tmp_path_factory.mktemp(f"world{world}"), TIMEOUT_S,
                              partial(_world_inputs, world)) for world in (2, 4)}


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, seed: int) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got - want).abs().max().item() if want.numel() else 0.0
    assert error <= TOLERANCE * max(want.abs().max().item(), 1e-300), f"{name}: max error {error:.3g} (seed {seed})"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_matches_single_process(case, groups):
    group = groups[case.world]
    want = _reference(case, group["inputs"][case.name])
    seed = group["seed"]
    ranks = group["ranks"]
    for name in ("o", "dq", "dk", "dv", "dbeta", "dg"):
        if name in want:
            _assert_close(name, torch.cat([r[case.name][name] for r in ranks], dim=1), want[name], seed)
    for rank, result in enumerate(ranks if case.final_state else []):
        _assert_close(f"final state on rank {rank}", result[case.name]["final"], want["final"], seed)
    if case.initial_state:
        _assert_close("dinitial_state (summed over ranks)",
                      torch.stack([r[case.name]["dinitial_state"] for r in ranks]).sum(0), want["dinitial_state"], seed)


def test_inconsistent_shards_raise_one_line_errors(groups):
    for messages in (r["errors"] for r in groups[2]["ranks"]):
        assert len(messages) == 2, messages
        total, shapes = messages
        assert "cu_seqlens must start at 0 and end at T=11" in total
        assert "every rank must pass the same (B, H, K, V, gated, cu_seqlens entries)" in shapes
        assert all("\n" not in m for m in messages)
