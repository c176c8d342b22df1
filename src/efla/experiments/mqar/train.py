"""Train a small EFLA / DeltaNet (or gated) language model on MQAR and score its recall, for a sweep of settings."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from efla.errors import TrainingDiverged
from efla.experiments.mqar.data import IGNORE, RecallTask, recall_batch

_EVAL_STREAM = 1_000_003  # offset of the evaluation examples' seed from the training stream's: disjoint draws


@dataclass
class SweepConfig:
    """Everything a sweep depends on (saved verbatim into results.json). The defaults are the CPU smoke run."""

    modes: tuple[str, ...] = ("efla", "delta")  # model variants (efla.variants), the gated ones too
    seq_lens: tuple[int, ...] = (64, 128)
    num_pairs: tuple[int, ...] = (16,)
    vocab_size: int = 64
    d_model: int = 64
    num_heads: int = 1
    num_layers: int = 2
    steps: int = 500
    batch_size: int = 32
    lrs: tuple[float, ...] = (3e-3, 1e-2)  # each setting reports its best rate, as Zoology does
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 50
    seeds: int = 1
    eval_examples: int = 256
    backend: str = "auto"
    chunk_size: int = 64
    device: str = "cpu"

    def tasks(self) -> list[RecallTask]:
        """Every (sequence length, pairs) setting with room for its queries (4 * pairs <= length)."""
        return [RecallTask(T, P, self.vocab_size) for T in self.seq_lens for P in self.num_pairs if 4 * P <= T]


def build_model(mode: str, task: RecallTask, config: SweepConfig) -> torch.nn.Module:
    """A ``num_layers``-layer EFLAForCausalLM (short convolution, SwiGLU of width 2 d) of variant ``mode`` ("efla",
    "delta", "gated-efla" or "gated-delta")."""
    from efla.models import EFLAForCausalLM, preset_config
    from efla.variants import variant_fields

    model_config = preset_config(
        "tiny", **variant_fields(mode), vocab_size=config.vocab_size, hidden_size=config.d_model,
        num_heads=config.num_heads, num_hidden_layers=config.num_layers, intermediate_size=2 * config.d_model,
        max_position_embeddings=task.seq_len, attn_backend=config.backend, chunk_size=config.chunk_size,
        use_cache=False,
    )  # fmt: skip
    return EFLAForCausalLM(model_config)


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer positions only."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def train_recall(
    mode: str, task: RecallTask, lr: float, seed: int, config: SweepConfig
) -> tuple[torch.nn.Module, list[float]]:
    """Train one model on fresh batches (seeded by ``seed``) with AdamW, linear warm-up and grad clipping; returns it
    and its per-step loss. Raises TrainingDiverged at the first non-finite loss."""
    torch.manual_seed(seed)
    model = build_model(mode, task, config).to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps))
    stream = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for step in range(1, config.steps + 1):
        inputs, labels = (x.to(config.device) for x in recall_batch(task, config.batch_size, stream))
        loss = _answer_loss(model(input_ids=inputs).logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise TrainingDiverged(f"{mode} T={task.seq_len} pairs={task.num_pairs} lr {lr:g} seed {seed}: loss became "
                                   f"{losses[-1]} at step {step}", step, losses[-1])  # fmt: skip
    return model, losses


@torch.no_grad()
def recall_accuracy(model: torch.nn.Module, task: RecallTask, config: SweepConfig, batch_size: int = 64) -> float:
    """Share (in %) of answers predicted exactly, over ``eval_examples`` held-out examples (the same for every
    model of a setting)."""
    model.eval()
    stream = torch.Generator().manual_seed(_EVAL_STREAM + task.seq_len * 1000 + task.num_pairs)
    correct = total = 0
    for start in range(0, config.eval_examples, batch_size):
        n = min(batch_size, config.eval_examples - start)
        inputs, labels = (x.to(config.device) for x in recall_batch(task, n, stream))
        predicted = model(input_ids=inputs).logits.argmax(-1)
        scored = labels != IGNORE
        correct += (predicted[scored] == labels[scored]).sum().item()
        total += scored.sum().item()
    return 100.0 * correct / total


def _runs(config: SweepConfig) -> Iterator[tuple[RecallTask, str, float, int]]:
    for task in config.tasks():
        for seed in range(config.seeds):
            for lr in config.lrs:
                for mode in config.modes:
                    yield task, mode, lr, seed


def run_sweep(config: SweepConfig, on_update: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Train and score one model per (setting, mode, lr, seed); returns the results.json dictionary.

    ``on_update`` receives the results after every run (status "running" until the last, then "complete", or
    "incomplete" when any run diverged). A diverged run is recorded with its step and loss; the others go on.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    runs: list[dict] = []
    timing = {"total_s": 0.0, "cpu_s": 0.0}
    results = {"status": "running", "config": {**asdict(config), "torch_threads": torch.get_num_threads(),
                                                "timing": timing}, "runs": runs}  # fmt: skip
    planned = list(_runs(config))
    for done, (task, mode, lr, seed) in enumerate(planned, start=1):
        record = {"mode": mode, "seq_len": task.seq_len, "num_pairs": task.num_pairs, "lr": lr, "seed": seed}
        tick = time.perf_counter()
        try:
            model, losses = train_recall(mode, task, lr, seed, config)
        except TrainingDiverged as diverged:
            record.update(status="diverged", step=diverged.step, loss=str(diverged.loss))
        else:
            record.update(status="finished", accuracy=recall_accuracy(model, task, config), loss_curve=losses)
        record["seconds"] = time.perf_counter() - tick
        runs.append(record)
        timing["total_s"], timing["cpu_s"] = time.perf_counter() - start, time.process_time() - cpu_start
        if done == len(planned):
            results["status"] = "incomplete" if any(r["status"] == "diverged" for r in runs) else "complete"
        if progress:
            finished = "accuracy" in record
            outcome = f"{record['accuracy']:.1f}% recall" if finished else f"diverged at step {record['step']}"
            print(f"[{done}/{len(planned)}] {mode} T={task.seq_len} pairs={task.num_pairs} lr {lr:g} seed {seed}: "
                  f"{outcome} ({record['seconds']:.0f} s)", flush=True)  # fmt: skip
        if on_update is not None:
            on_update(results)
    return results
