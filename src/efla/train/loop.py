"""``train(config)``: the training run, the same code on one process and under torchrun (DDP or FSDP2).

Every step: each rank reads its slice of the step's rows (efla.train.packing), runs grad_accum micro-batches
(gradients synchronised only on the last), clips the global grad norm, steps AdamW and the cosine schedule. The loss
is the mean next-token cross-entropy over the counted targets of the whole global batch: each micro-batch
backpropagates its summed loss divided by the step's target count (times the world size, which DDP and FSDP average
over), so an N-rank run follows a one-process run with the same global batch step by step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from efla.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_model
from efla.train.config import TrainConfig
from efla.train.data import (
    TokenCorpus,
    build_token_cache,
    cache_key,
    dataset_documents,
    expand_paths,
    file_sources,
    read_documents,
)
from efla.train.distributed import World, any_rank, barrier, close_world, init_world, parallelize, sum_over_ranks
from efla.train.packing import PackedRows, StepSampler, make_batch
from efla.train.profiling import StepProfiler
from efla.train.tokenizer import load_tokenizer


class BatchTooLargeError(RuntimeError):
    """The GPU ran out of memory at the configured micro-batch size (the message says which and what to change)."""


def train(config: TrainConfig) -> Path | None:
    """Run (or resume) training; returns the final model folder (``out_dir/model``, loadable with
    AutoModelForCausalLM.from_pretrained after ``import efla``), or None when stopped early by SIGTERM/SIGINT, in
    which case a checkpoint of the last finished step was written and ``--resume`` continues from it."""
    world = init_world(config.device)
    try:
        return _Run(config, world).run()
    finally:
        close_world()


class _Run:
    """The state of one training run (kept together so that checkpoints and signals can reach it)."""

    def __init__(self, config: TrainConfig, world: World) -> None:
        self.config, self.world = config, world
        self.out_dir = Path(config.out_dir).expanduser()
        self.ckpt_dir = self.out_dir / "checkpoints"
        if world.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        self.tokenizer = load_tokenizer(config.tokenizer)
        # settings checked before the (possibly long) tokenisation
        model_cfg = model_config(config, self.tokenizer)
        resume_from = None if config.resume is None else find_checkpoint(config.resume, self.ckpt_dir)
        self.corpus_key, corpus = self._corpus()
        self.rows = PackedRows(corpus, config.seq_len)
        self.global_batch = config.micro_batch_size * config.grad_accum * world.size
        self.sampler = StepSampler(len(self.rows), self.global_batch, config.seed)
        self.total_steps = config.total_steps(world.size)

        torch.manual_seed(config.seed)  # the same initial weights on every rank (FSDP shards each rank's copy)
        from transformers import AutoModelForCausalLM

        self.plain_model = AutoModelForCausalLM.from_config(model_cfg).to(world.device)
        self.flatten = config.pack_boundaries and "cu_seqlens" in inspect.signature(self.plain_model.forward).parameters
        if config.pack_boundaries and not self.flatten:
            self._log("note: the model's forward takes no cu_seqlens, so rows are trained without document "
                      "boundaries (documents still end with eos)")
        self.model = parallelize(self.plain_model, config.strategy, world, config.compile)
        self.optimizer = _adamw(self.model, config, world.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _cosine_with_warmup(config,
                                                                                                self.total_steps))
        self.step = 0
        self.last_saved = -1
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer, world)
            self._check_same_data(state["data"], resume_from)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = self.last_saved = state["step"]
            self._log(f"resumed from {resume_from} at step {self.step}")
        self.stop_requested = False

    def run(self) -> Path | None:
        config, world = self.config, self.world
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        logger = _MetricsLogger(self.out_dir, world, self.total_steps, self.step)
        profiler = StepProfiler(self.out_dir, config.profile_steps, world.device, enabled=world.is_main)
        try:
            while self.step < self.total_steps:
                profiler.before_step()
                record = self._train_step()
                profiler.after_step()
                self.step += 1
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    logger.log({"step": self.step, **record})
                if any_rank(self.stop_requested, world):
                    self._save()
                    self._log(f"stopped by signal after step {self.step}; checkpoint saved in {self.ckpt_dir}; "
                              "continue with --resume")
                    return None
                if self.step % config.save_every == 0:
                    self._save()
            self._save()
            return self._save_final()
        finally:
            profiler.finish()
            logger.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _train_step(self) -> dict[str, float]:
        config, world = self.config, self.world
        start = time.perf_counter()
        indices = self.sampler.rank_rows(self.step, world.rank, world.size)
        num_targets = self.rows.num_targets(self.sampler.step_rows(self.step), self.flatten)
        total_loss = torch.zeros((), device=world.device)
        try:
            for micro in range(config.grad_accum):
                batch = make_batch(self.rows, indices[micro * config.micro_batch_size:
                                                      (micro + 1) * config.micro_batch_size], self.flatten)
                with self._grad_sync(micro == config.grad_accum - 1):
                    loss_sum = self._loss_sum(batch)
                    (loss_sum * (world.size / num_targets)).backward()
                total_loss += loss_sum.detach()
        except torch.OutOfMemoryError:
            self._out_of_memory()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum_over_ranks(total_loss, world).item() / num_targets
        tokens = self.global_batch * config.seq_len
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens": (self.step + 1) * tokens,
                  "tokens_per_s": tokens / (time.perf_counter() - start)}
        if world.device.type == "cuda":  # this rank's peak since the start, for memory per GPU
            record["peak_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
        return record

    def _loss_sum(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The summed cross-entropy of a micro-batch's targets (-100: not counted)."""
        device = self.world.device
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device), "use_cache": False}
        if batch["cu_seqlens"] is not None:
            inputs["cu_seqlens"] = batch["cu_seqlens"].to(device)
        autocast = device.type == "cuda" and self.config.precision == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = self.model(**inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].to(device).flatten(), reduction="sum")

    def _grad_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel) and not sync:
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _out_of_memory(self) -> None:
        """Free the step's gradients, keep the last finished step (one process: the others would wait for this
        rank forever), and say which batch size failed."""
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        saved = ""
        if self.world.size == 1 and self.step > 0:
            self._save()
            saved = f" The state after step {self.step} is saved in {self.ckpt_dir}; continue with --resume."
        raise BatchTooLargeError(
            f"CUDA out of memory on rank {self.world.rank} with micro_batch_size {self.config.micro_batch_size} "
            f"(seq_len {self.config.seq_len}) at step {self.step + 1}. Lower --micro-batch-size and raise "
            f"--grad-accum to keep the global batch.{saved}") from None

    def _save(self) -> None:
        if self.step == self.last_saved:
            return
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self._data_identity()}
        save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, state, self.world,
                        self.config.keep_checkpoints)
        self.last_saved = self.step

    def _save_final(self) -> Path:
        """The trained model (safetensors + config) and its tokenizer in out_dir/model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        folder = self.out_dir / "model"
        if self.world.is_main:
            save_model(folder, self.plain_model, state)
            self.tokenizer.save_pretrained(str(folder))
            self._log(f"model saved in {folder}")
        barrier(self.world)
        return folder

    def _corpus(self) -> tuple[str, TokenCorpus]:
        """Tokenise the corpus on rank 0 (others wait), then open the memory-mapped cache on every rank."""
        config, world = self.config, self.world
        if config.dataset is not None:
            sources: dict[str, Any] = {"dataset": config.dataset, "config": config.dataset_config,
                                       "split": config.dataset_split, "text_field": config.text_field}
            documents = dataset_documents(config.dataset, config.dataset_config, config.dataset_split,
                                          config.text_field)
        else:
            files = expand_paths(config.data)
            if not files:
                raise FileNotFoundError(f"no corpus file found in {config.data}")
            sources = file_sources(files, config.text_field)
            documents = read_documents(files, config.text_field)
        key = cache_key(sources, self.tokenizer)
        folder = Path(config.cache_dir).expanduser() / key
        error: Exception | None = None
        if world.is_main:
            try:
                folder.parent.mkdir(parents=True, exist_ok=True)
                self._log(f"token cache {folder}")
                build_token_cache(documents, self.tokenizer, folder)
            except Exception as caught:  # re-raised below once the other ranks know
                error = caught
        if any_rank(error is not None, world):
            if error is not None:
                raise error
            raise RuntimeError("rank 0 could not prepare the corpus (its error is above)")
        return key, TokenCorpus.open(folder)

    def _data_identity(self) -> dict[str, Any]:
        """What the data position (the step) means: resuming with a different corpus or batch would not continue
        the same run."""
        return {"corpus": self.corpus_key, "seq_len": self.config.seq_len, "global_batch": self.global_batch,
                "seed": self.config.seed}

    def _check_same_data(self, saved: dict[str, Any], path: Path) -> None:
        current = self._data_identity()
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume from {path}: the data differs from the checkpoint's "
                             f"(field: (checkpoint, now)) {changed}")

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True

    def _log(self, message: str) -> None:
        if self.world.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)  # beside the progress bar


def model_config(config: TrainConfig, tokenizer: Any) -> Any:
    """The model configuration: a preset or a config file/folder, the overrides, the tokenizer's vocabulary size
    and special tokens. Raises when seq_len is longer than the model's max_position_embeddings."""
    from transformers import AutoConfig

    from efla.models import PRESETS, preset_config

    overrides = dict(config.model_overrides)
    overrides.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        overrides.setdefault(name, getattr(tokenizer, name))
    if config.model in PRESETS:
        model_cfg = preset_config(config.model, **overrides)
    else:
        path = Path(config.model).expanduser()
        if not path.exists():
            raise ValueError(f"model must be a preset {sorted(PRESETS)} or a config.json / model folder "
                             f"(got {config.model!r}, which does not exist)")
        values = {**AutoConfig.from_pretrained(str(path)).to_dict(), **overrides}
        # a saved bf16 model's dtype would make from_config build bf16 weights (and AdamW state): train in float32
        values.pop("dtype", None)
        values.pop("torch_dtype", None)
        model_cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"seq_len {config.seq_len} is longer than the model's max_position_embeddings {limit}; "
                         f"lower --seq-len or pass --model-overrides '{{\"max_position_embeddings\": "
                         f"{config.seq_len}}}'")
    return model_cfg


def _adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear, embedding, conv weights) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                             fused=device.type == "cuda")


def _cosine_with_warmup(config: TrainConfig, total_steps: int):
    """lr multiplier at a step: linear warmup from 1/warmup to 1, then cosine down to min_lr_ratio."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _MetricsLogger:
    """Rank 0's outputs: a tqdm bar, metrics.jsonl (one JSON record per logged step) and TensorBoard if installed."""

    def __init__(self, out_dir: Path, world: World, total_steps: int, start_step: int) -> None:
        self.enabled = world.is_main
        if not self.enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.file = (out_dir / "metrics.jsonl").open("a")
        self.writer = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record["step"])
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             gnorm=f"{record['grad_norm']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.writer is not None:
            for name, value in record.items():
                if name != "step":
                    self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
