"""An EFLA causal LM under context parallelism against the same model on the whole sequence in one process: gloo on
the CPU with 2 and 4 spawned processes, float64. The sum of the ranks' losses and the sum of the ranks' gradients of
every parameter equal the single-process loss and gradients to 1e-10 (relative), except for what the library sums
over tokens in float32 whatever the dtype, which agrees to float32 rounding: the loss (``causal_lm_loss`` returns
float32), the RMSNorm weights' gradients and the lm_head's (``linear_cross_entropy``). With shards of different lengths
(empty, and shorter than the convolution's halo), packed documents crossing ranks (and a document boundary inside a
halo), labels shifted by the model across ranks or shift_labels shifted by the caller, and both activation
checkpointing policies. A hybrid model (softmax attention layers) gets a one-line error.

Each world size runs all its cases in one spawn (starting processes is the slow part).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")

from gloo_group import gloo_group, run_seeded

from efla.models import EFLAConfig, EFLAForCausalLM
from efla.models.context_parallel import apply_context_parallel
from efla.models.loss import IGNORE_INDEX

TIMEOUT_S = 60
TOLERANCE = 1e-10
FLOAT32_SUMS = ("norm.weight", "lm_head.weight")
"""Parameters whose gradients are sums over tokens in float32: compared to float32 rounding (FLOAT32_TOLERANCE)."""
FLOAT32_TOLERANCE = 1e-6
VOCAB = 64
BASE = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
            attn_backend="torch", chunk_size=16, initializer_range=0.2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison: the shard lengths fix the world size; offsets (packed documents, B = 1) or B sequences."""

    name: str
    lengths: tuple[int, ...]
    offsets: tuple[int, ...] | None = None
    batch: int = 2
    config: tuple[tuple[str, object], ...] = ()
    shift_labels: bool = False  # the caller shifts the targets over the whole sequence
    checkpointing: str | None = None

    @property
    def world(self) -> int:
        return len(self.lengths)


CASES = [
    Case("sequences-2", (23, 18)),
    Case("sequences-2-shard-shorter-than-halo", (2, 30), config=(("attn_mode", "delta"),)),
    Case("packed-2-crossing", (30, 27), offsets=(0, 10, 40, 41, 57)),
    Case("packed-2-gated-shift-labels", (26, 21), offsets=(0, 26, 30, 47), shift_labels=True,
         config=(("use_decay_gate", True), ("use_output_gate", True), ("attn_mode", "delta"))),
    Case("sequences-4-uneven-selective", (20, 2, 0, 15), checkpointing="selective",
         config=(("use_decay_gate", True),)),
    # rank 3 starts at 15 inside the document [14, 30): its halo (positions 12..14) crosses the boundaries at 13, 14
    Case("packed-4-boundary-in-halo-full", (12, 1, 2, 25), offsets=(0, 5, 13, 14, 30, 40), checkpointing="full"),
    Case("packed-4-empty-shards-wide-conv", (0, 17, 0, 3), offsets=(0, 9, 18, 20),
         config=(("conv_size", 6), ("use_output_gate", True))),
]


def _config(case: Case, **overrides) -> EFLAConfig:
    return EFLAConfig(**{**BASE, **dict(case.config), **overrides})


def _shifted(labels: torch.Tensor, offsets: tuple[int, ...] | None) -> torch.Tensor:
    """The next-token targets of the whole sequence, written out: label t + 1 at position t, -100 at a row's end
    and before each document's start."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    for start in (offsets or (0, 0))[1:-1]:
        if start > 0:
            targets[0, start - 1] = IGNORE_INDEX
    return targets


def _inputs(case: Case, generator: torch.Generator) -> dict:
    """The whole sequence: input ids, labels with some ignored (-100), the model's initial weights."""
    B = 1 if case.offsets else case.batch
    T = sum(case.lengths)
    ids = torch.randint(1, VOCAB, (B, T), generator=generator)
    labels = ids.masked_fill(torch.rand(B, T, generator=generator) < 0.2, IGNORE_INDEX)
    torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
    weights = EFLAForCausalLM(_config(case)).double().state_dict()
    return {"ids": ids, "labels": labels, "weights": weights,
            "cu_seqlens": torch.tensor(case.offsets, dtype=torch.int32) if case.offsets else None}


def _model(case: Case, weights: dict) -> EFLAForCausalLM:
    model = EFLAForCausalLM(_config(case)).double()
    model.load_state_dict(weights)
    if case.checkpointing:
        model.activation_checkpointing_enable({"policy": case.checkpointing})
    return model.train()


def _loss_and_grads(model: EFLAForCausalLM, case: Case, ids, labels, cu_seqlens, shift_labels) -> dict:
    target = {"shift_labels": shift_labels} if case.shift_labels else {"labels": labels}
    loss = model(input_ids=ids, cu_seqlens=cu_seqlens, **target).loss
    loss.backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    return {"loss": loss.detach(), "grads": grads}


def _reference(case: Case, x: dict) -> dict:
    return _loss_and_grads(_model(case, x["weights"]), case, x["ids"], x["labels"], x["cu_seqlens"],
                           _shifted(x["labels"], case.offsets))


def _rank_run(case: Case, x: dict, rank: int) -> dict:
    start = sum(case.lengths[:rank])
    shard = slice(start, start + case.lengths[rank])
    model = apply_context_parallel(_model(case, x["weights"]), dist.group.WORLD)
    return _loss_and_grads(model, case, x["ids"][:, shard], x["labels"][:, shard], x["cu_seqlens"],
                           _shifted(x["labels"], case.offsets)[:, shard])


def _errors() -> dict[str, str]:
    """The one-line errors of what context parallelism does not take (every rank raises the same, before any
    collective, so none waits on the others)."""
    hybrid = EFLAForCausalLM(EFLAConfig(**{**BASE, "num_hidden_layers": 3, "attn_layers": [1]}))
    model = apply_context_parallel(EFLAForCausalLM(EFLAConfig(**BASE)), dist.group.WORLD)
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 0] = 0
    calls = {"hybrid": lambda: apply_context_parallel(hybrid, dist.group.WORLD),
             "position_ids": lambda: model(ids, position_ids=torch.arange(6).expand(2, 6)),
             "padding": lambda: model(ids, attention_mask=mask),
             "packed rows": lambda: model(ids, cu_seqlens=torch.tensor([0, 12], dtype=torch.int32))}
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
    return messages


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    with gloo_group(rank, world, port, TIMEOUT_S):
        inputs = torch.load(Path(folder) / "inputs.pt", weights_only=False)
        results = {case.name: _rank_run(case, inputs[case.name], rank) for case in CASES if case.name in inputs}
        results["errors"] = _errors()
        torch.save(results, Path(folder) / f"rank{rank}.pt")



def _world_inputs(world: int, generator: torch.Generator) -> dict:
    """The inputs of this world size's cases."""
    return {case.name: _inputs(case, generator) for case in CASES if case.world == world}


@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> dict[int, dict]:
    return {world: run_seeded(_worker, world, tmp_path_factory.mktemp(f"world{world}"), TIMEOUT_S,
                              partial(_world_inputs, world)) for world in (2, 4)}


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor, seed: int, tolerance: float = TOLERANCE) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got - want).abs().max().item()
    assert error <= tolerance * max(want.abs().max().item(), 1e-300), f"{name}: max error {error:.3g} (seed {seed})"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_loss_and_gradients_match_single_process(case, groups):
    group = groups[case.world]
    want = _reference(case, group["inputs"][case.name])
    ranks = [r[case.name] for r in group["ranks"]]
    assert want["loss"].dtype == torch.float32
    _assert_close("loss (summed over ranks)", sum(r["loss"] for r in ranks), want["loss"], group["seed"],
                  FLOAT32_TOLERANCE)
    assert want["grads"], "no parameters"
    for name, grad in want["grads"].items():
        assert grad.abs().max() > 0, f"{name}: zero reference gradient"
        tolerance = FLOAT32_TOLERANCE if name.endswith(FLOAT32_SUMS) else TOLERANCE
        _assert_close(f"d{name} (summed over ranks)", sum(r["grads"][name] for r in ranks), grad, group["seed"],
                      tolerance)


def test_unsupported_inputs_raise_one_line_errors(groups):
    expected = {"hybrid": "context parallelism does not support softmax attention layers (attn_layers [1])",
                "position_ids": "under context parallelism pass packed documents as the global cu_seqlens",
                "padding": "context parallelism (cp_group) takes no padding attention_mask and no cache",
                "packed rows": "packed documents (cu_seqlens) under context parallelism take one row of input_ids"}
    for ranks in (groups[2]["ranks"], groups[4]["ranks"]):
        for messages in (r["errors"] for r in ranks):
            assert messages.keys() == expected.keys(), messages
            for name, text in expected.items():
                assert text in messages[name] and "\n" not in messages[name], (name, messages[name])


COMPILED_CASE = Case("packed-2-crossing-compiled", (30, 27), offsets=(0, 10, 40, 41, 57),
                     config=(("use_decay_gate", True),))
COMPILED_TOLERANCE = 1e-5
"""Inductor reorders the norms' float32 sums: compiled and eager agree to float32 rounding."""
COMPILED_TIMEOUT_S = 240


def _compiled_worker(rank: int, world: int, port: int, folder: str) -> None:
    with gloo_group(rank, world, port, COMPILED_TIMEOUT_S):
        x = torch.load(Path(folder) / "inputs.pt", weights_only=False)
        results = {}
        for compiled in (False, True):
            model = apply_context_parallel(_model(COMPILED_CASE, x["weights"]), dist.group.WORLD)
            if compiled:
                for block in model.model.layers:
                    block.compile(backend="inductor")
            start = sum(COMPILED_CASE.lengths[:rank])
            shard = slice(start, start + COMPILED_CASE.lengths[rank])
            results[compiled] = _loss_and_grads(model, COMPILED_CASE, x["ids"][:, shard], x["labels"][:, shard],
                                                x["cu_seqlens"], None)
        torch.save(results, Path(folder) / f"rank{rank}.pt")


def test_blocks_compiled_under_context_parallelism_equal_eager(tmp_path):
    """Each block compiled with Inductor (``efla train --compile --context-parallel 2``): the collectives run behind
    graph breaks in the same order on every rank (traced, two ranks waited on each other for ever), and each rank's
    loss and gradients equal the eager run's."""
    group = run_seeded(_compiled_worker, COMPILED_CASE.world, tmp_path, COMPILED_TIMEOUT_S,
                       partial(_inputs, COMPILED_CASE))
    seed = group["seed"]
    for rank in group["ranks"]:
        eager, compiled = rank[False], rank[True]
        _assert_close("loss", compiled["loss"], eager["loss"], seed, COMPILED_TOLERANCE)
        for name, grad in eager["grads"].items():
            assert grad.abs().max() > 0, f"{name}: zero gradient"
            _assert_close(f"d{name}", compiled["grads"][name], grad, seed, COMPILED_TOLERANCE)
