"""Train EFLA and DeltaNet classifiers on sequential MNIST and measure their accuracy under each corruption grid."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from efla.data import MnistSplit
from efla.errors import TrainingDiverged
from efla.experiments.smnist.corruptions import CORRUPTIONS
from efla.experiments.smnist.model import METHODS, ClassifierConfig, SequentialClassifier
from efla.experiments.smnist.report import loss_flatness


@dataclass
class StudyConfig:
    """Everything a study run depends on (saved verbatim into results.json)."""

    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    steps: int = 200  # per model, ignored when epochs is set: past both methods' knees, ~8 min on 2 CPU cores
    epochs: int | None = None
    batch_size: int = 128
    lr: dict[str, float] = field(default_factory=lambda: {"efla": 3e-3, "delta": 1e-3})  # the paper's rates
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"  # "cosine": from lr down to 0 over the run, so every run ends converged; or "constant"
    eval_batch_size: int = 250
    eval_seed: int = 1234
    d_model: int = 64
    backend: str = "auto"
    chunk_size: int = 56  # divides 784: no padded chunk; 20 % faster than 64 on CPU (torch backend only)
    device: str = "cpu"


_LR_FACTORS: dict[str, Callable[[int], Callable[[int], float]]] = {
    "cosine": lambda steps: lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)),
    "constant": lambda steps: lambda step: 1.0,
}
LR_SCHEDULES = tuple(_LR_FACTORS)


def to_pixels(images: np.ndarray, device: str) -> torch.Tensor:
    """uint8 images [N, 784] -> float32 intensities in [0, 1] on ``device``."""
    return torch.from_numpy(images).to(device=device, dtype=torch.float32) / 255.0


def train_classifier(
    method: str,
    seed: int,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    config: StudyConfig,
    progress: bool = True,
) -> tuple[SequentialClassifier, list[float]]:
    """Train one classifier with AdamW and grad-norm clipping; returns it and its per-step training loss.

    ``seed`` fixes both the initial weights and the order of the batches, which are therefore the same for every
    method (the models have identical parameter shapes). Raises TrainingDiverged at the first non-finite loss.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model_config = ClassifierConfig(method, config.d_model, backend=config.backend, chunk_size=config.chunk_size)
    model = SequentialClassifier(model_config).to(config.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr[method], weight_decay=config.weight_decay)
    order = torch.Generator().manual_seed(seed)
    n_batches = len(labels) // config.batch_size
    if n_batches == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(labels)} training digits")
    steps = config.epochs * n_batches if config.epochs is not None else config.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _LR_FACTORS[config.lr_schedule](steps))
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=f"train {method} seed {seed}", disable=not progress, leave=False)
    try:
        while len(losses) < steps:
            permutation = torch.randperm(len(labels), generator=order).to(config.device)
            for batch in permutation[: n_batches * config.batch_size].view(n_batches, -1):
                loss = F.cross_entropy(model(pixels[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if not math.isfinite(losses[-1]):
                    raise TrainingDiverged(f"{method} seed {seed}: loss became {losses[-1]} at step {len(losses)}",
                                           len(losses), losses[-1])
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update()
                if len(losses) == steps:
                    break
    finally:
        bar.close()
    return model, losses


@torch.no_grad()
def accuracy(model: SequentialClassifier, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """Top-1 accuracy in percent, evaluated in batches of ``batch_size``."""
    model.eval()
    correct = sum(
        (model(pixels[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum().item()
        for i in range(0, len(labels), batch_size)
    )
    return 100.0 * correct / len(labels)


def robustness(
    model: SequentialClassifier,
    pixels: torch.Tensor,
    labels: torch.Tensor,
    config: StudyConfig,
    progress: bool = True,
) -> tuple[float, dict[str, dict[str, float]]]:
    """Clean accuracy and accuracy at every level of every corruption grid.

    Each grid point draws its noise from a generator reset to ``eval_seed``, so every model sees identical corrupted
    images; levels that leave the image unchanged reuse the clean accuracy instead of recomputing it.
    """
    from tqdm.auto import tqdm

    clean = accuracy(model, pixels, labels, config.eval_batch_size)
    points = [(c, level) for c in CORRUPTIONS for level in c.levels if level != c.identity]
    grids: dict[str, dict[str, float]] = {c.name: {str(c.identity): clean} for c in CORRUPTIONS}
    for corruption, level in tqdm(points, desc=f"evaluate {model.config.method}", disable=not progress, leave=False):
        generator = torch.Generator(device=pixels.device).manual_seed(config.eval_seed)
        corrupted = corruption.apply(pixels, level, generator)
        grids[corruption.name][str(level)] = accuracy(model, corrupted, labels, config.eval_batch_size)
    ordered = {c.name: {str(level): grids[c.name][str(level)] for level in c.levels} for c in CORRUPTIONS}
    return clean, ordered


def _empty_entry(lr: float) -> dict:
    """One method's results before any run: finished seeds, their accuracies and loss curves, diverged runs."""
    entry: dict = {"lr": lr, "seeds": [], "clean_accuracy": []}
    entry.update({c.name: {str(level): [] for level in c.levels} for c in CORRUPTIONS})
    entry["loss_curves"] = []
    entry["loss_flatness"] = None
    entry["diverged"] = []
    return entry


def _record(entry: dict, seed: int, losses: list[float], clean: float, grids: dict[str, dict[str, float]]) -> None:
    entry["seeds"].append(seed)
    entry["clean_accuracy"].append(clean)
    for name, grid in grids.items():
        for level, value in grid.items():
            entry[name][level].append(value)
    entry["loss_curves"].append(losses)
    entry["loss_flatness"] = loss_flatness(entry["loss_curves"])


def run_study(
    data: MnistSplit,
    config: StudyConfig,
    progress: bool = True,
    on_update: Callable[[dict], None] | None = None,
) -> dict:
    """Train every method for every seed, evaluate each on all grids; returns the results.json dictionary.

    Runs go seed by seed, both methods per seed, so a partial study still compares like with like. ``on_update``
    receives the results after every finished or diverged run (status "running" until the last, then "complete",
    or "incomplete" when any run diverged), so a caller can save them as they come. A diverged run is recorded under
    its method's "diverged" with its step and loss; the other runs go on.
    """
    start, cpu_start = time.perf_counter(), time.process_time()
    train_x, test_x = to_pixels(data.train_images, config.device), to_pixels(data.test_images, config.device)
    train_y = torch.from_numpy(data.train_labels).to(config.device)
    test_y = torch.from_numpy(data.test_labels).to(config.device)
    methods = {method: _empty_entry(config.lr[method]) for method in config.methods}
    timing = {"train_s": 0.0, "eval_s": 0.0, "total_s": 0.0, "cpu_s": 0.0}
    summary = {
        **asdict(config),
        "data": data.source,
        "n_train": len(data.train_labels),
        "n_test": len(data.test_labels),
        "torch_threads": torch.get_num_threads(),
        "timing": timing,
    }
    results = {"status": "running", "config": summary, "methods": methods}
    runs = [(seed, method) for seed in range(config.seeds) for method in config.methods]
    for done, (seed, method) in enumerate(runs, start=1):
        tick = time.perf_counter()
        try:
            model, losses = train_classifier(method, seed, train_x, train_y, config, progress)
        except TrainingDiverged as diverged:
            methods[method]["diverged"].append({"seed": seed, "step": diverged.step, "loss": str(diverged.loss)})
            if progress:
                print(f"{method} seed {seed}: diverged (loss {diverged.loss} at step {diverged.step})")
        else:
            tock = time.perf_counter()
            clean, grids = robustness(model, test_x, test_y, config, progress)
            timing["train_s"] += tock - tick
            timing["eval_s"] += time.perf_counter() - tock
            _record(methods[method], seed, losses, clean, grids)
            if progress:
                print(f"{method} seed {seed}: final loss {np.mean(losses[-20:]):.3f}, clean accuracy {clean:.1f}%")
        timing["total_s"] = time.perf_counter() - start
        timing["cpu_s"] = time.process_time() - cpu_start  # all threads; compare with total_s
        if done == len(runs):
            diverged = any(entry["diverged"] for entry in methods.values())
            results["status"] = "incomplete" if diverged else "complete"
        if on_update is not None:
            on_update(results)
    return results
