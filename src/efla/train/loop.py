"""``train(config)``: the training run, the same code on one process and under torchrun (DDP or FSDP2).

Every step: each rank reads its slice of the step's rows (efla.train.packing), runs grad_accum micro-batches
(gradients synchronised only on the last), clips the global grad norm, steps AdamW and the cosine schedule. The loss
is the mean next-token cross-entropy over the counted targets of the whole global batch: each micro-batch
backpropagates its summed loss divided by the step's target count (times the world size, which DDP and FSDP average
over), so an N-rank run follows a one-process run with the same global batch step by step.

With ``context_parallel`` C > 1 the ranks of one data group (efla.train.distributed) read the same rows and each
feeds the model its contiguous slice along T of the inputs and of the targets (shifted over the whole row before
slicing), with the global cu_seqlens; each rank's loss sum then covers its own tokens only, the same scaling makes the
world average of the gradients exact, and the logged loss sums over all ranks, so it counts each token once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from efla.errors import TrainingDiverged
from efla.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_model
from efla.train.checkpointing import apply_activation_checkpointing, check_activation_checkpointing
from efla.train.config import DEFAULT_SEQ_LEN, TrainConfig
from efla.train.data import (
    TokenCorpus,
    build_token_cache,
    cache_key,
    dataset_documents,
    expand_paths,
    file_sources,
    read_documents,
)
from efla.train.distributed import (
    World,
    any_rank,
    barrier,
    close_world,
    context_shard,
    from_main,
    init_world,
    parallelize,
    sum_over_ranks,
)
from efla.train.metrics import MetricsLogger
from efla.train.packing import PackedRows, StepSampler, make_batch
from efla.train.profiling import StepProfiler
from efla.train.run_dir import (
    check_out_dir,
    clear_outputs,
    describe_changes,
    existing_outputs,
    model_config_changes,
    remove_new_outputs,
    setting_changes,
    truncate_metrics,
)
from efla.train.tokenizer import load_tokenizer
from efla.vocab import check_tokenizer_fits


class BatchTooLargeError(RuntimeError):
    """The GPU ran out of memory at the configured micro-batch size (the message says which and what to change)."""


class TrainingStopped(RuntimeError):
    """SIGTERM or SIGINT stopped the run after a checkpoint of its last finished step (``signum``: the signal)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def train(config: TrainConfig) -> Path:
    """Run (or resume) training; returns the final model folder (``out_dir/model``, loadable with
    AutoModelForCausalLM.from_pretrained after ``import efla``).

    Raises TrainingStopped when SIGTERM/SIGINT ended the run early (a checkpoint of the last finished step is written
    and ``resume="latest"`` continues from it), TrainingDiverged on a non-finite loss (the optimizer has not applied
    that step, and no checkpoint holds it), BatchTooLargeError when the GPU runs out of memory, and ValueError /
    FileNotFoundError for bad settings or input (before anything in ``out_dir`` is changed). A new run that fails
    before its first step is finished removes the files it created, so the same command can run again."""
    world = init_world(config.device, config.context_parallel)
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
        self._on_main(lambda: check_out_dir(self.out_dir, config.resume is not None, config.overwrite))
        self.tokenizer = load_tokenizer(config.tokenizer)
        # settings checked before the (possibly long) tokenisation
        model_cfg = model_config(config, self.tokenizer)
        if config.context_parallel > 1 and getattr(model_cfg, "attn_layers", None):
            raise ValueError(f"context_parallel {config.context_parallel} does not support softmax attention layers "
                             f"(attn_layers {model_cfg.attn_layers}): use a model without attn_layers, or "
                             "--context-parallel 1")
        # said once the run starts (a start that fails prints only its error)
        self.notes = [note for note in (_vocab_size_note(config, model_cfg.vocab_size),) if note is not None]
        if config.seq_len is None:  # the model's own context length
            config = self.config = dataclasses.replace(
                config, seq_len=getattr(model_cfg, "max_position_embeddings", None) or DEFAULT_SEQ_LEN)
        resume_from = None
        if config.resume is not None:
            resume_from = Path(self._on_main(lambda: str(find_checkpoint(config.resume, self.ckpt_dir, self._log))))
            self._check_same_model(model_cfg, resume_from)
        self.corpus_key, corpus = self._corpus()
        self.rows = PackedRows(corpus, config.seq_len)
        self.global_batch = config.micro_batch_size * config.grad_accum * world.data_size
        self.val_rows = self._held_out_rows()
        self.sampler = StepSampler(len(self.rows) - len(self.val_rows), self.global_batch, config.seed)
        self.total_steps = config.total_steps(world.data_size)
        if config.warmup_steps >= self.total_steps:
            self.notes.append(f"warning: warmup_steps {config.warmup_steps} >= the run's {self.total_steps} steps, so "
                              f"the learning rate never reaches lr {config.lr}; lower --warmup-steps")

        torch.manual_seed(config.seed)  # the same initial weights on every rank (FSDP shards each rank's copy)
        from transformers import AutoModelForCausalLM

        self.plain_model = AutoModelForCausalLM.from_config(model_cfg).to(world.device)
        apply_activation_checkpointing(self.plain_model, config.activation_checkpointing)
        self.flatten = config.pack_boundaries and "cu_seqlens" in inspect.signature(self.plain_model.forward).parameters
        if config.pack_boundaries and not self.flatten:
            self._log("note: the model's forward takes no cu_seqlens, so rows are trained without document "
                      "boundaries (documents still end with eos)")
        # not by default under context parallelism: compiled CP blocks are tested on the CPU (gloo), not on GPUs yet
        compile_blocks = (config.compile if config.compile is not None
                          else world.device.type == "cuda" and config.context_parallel == 1)
        self.model = parallelize(self.plain_model, config.strategy, world, compile_blocks)
        self.optimizer = _adamw(self.model, config, world.device)
        self.scheduler = _schedule(self.optimizer, config, self.total_steps)
        self.step = 0
        self.last_saved = -1
        if resume_from is not None:
            state = load_checkpoint(resume_from, self.model, self.optimizer, world)
            self._check_same_data(state["data"], resume_from)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = self.last_saved = state["step"]
            if self.step > self.total_steps:
                raise ValueError(f"{resume_from} is at step {self.step}, past this run's {self.total_steps} steps: "
                                 "raise --max-steps / --max-tokens to train on, or leave out --resume")
            self._apply_changed_settings(state.get("settings"))
            self._log(f"resumed from {resume_from} at step {self.step}")
        self.stop_signal: int | None = None
        self.outputs_before: set[str] | None = None  # a new run's outputs already in out_dir when it started
        self.created_out_dir = False

    def run(self) -> Path:
        """Prepare the run folder and train; a new run that fails before its first step is finished removes what it
        created there, so that nothing blocks running the same command again."""
        try:
            self._start()
            barrier(self.world)
            return self._train()
        except BaseException:
            if self.config.resume is None and self.step == 0 and self.outputs_before is not None:
                remove_new_outputs(self.out_dir, self.outputs_before, self.created_out_dir)
            raise

    def _start(self) -> None:
        """Rank 0 prepares the run folder once every setting and input has been checked: says the run's notes,
        deletes a previous run's outputs (--overwrite), cuts metrics.jsonl back to the resumed step, writes
        train_config.json."""
        if not self.world.is_main:
            return
        for note in self.notes:
            self._log(note)
        if self.config.overwrite:
            deleted = clear_outputs(self.out_dir)
            if deleted:
                self._log(f"--overwrite: deleted the previous run's {', '.join(deleted)} in {self.out_dir}")
        self.created_out_dir = not self.out_dir.exists()
        self.outputs_before = existing_outputs(self.out_dir)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if self.config.resume is not None:
            dropped = truncate_metrics(self.out_dir / "metrics.jsonl", self.step)
            if dropped:
                self._log(f"metrics.jsonl: dropped {dropped} record(s) after step {self.step}, which are trained again")
        (self.out_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))

    def _train(self) -> Path:
        config, world = self.config, self.world
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        logger = MetricsLogger(self.out_dir, world.is_main, self.total_steps, self.step,
                               config.wandb_project if config.wandb else None, dataclasses.asdict(config))
        profiler = StepProfiler(self.out_dir, config.profile_steps, world.device, enabled=world.is_main)
        window_steps, window_seconds = 0, 0.0  # the training steps since the last record, and their time
        try:
            while self.step < self.total_steps:
                profiler.before_step()
                start = time.perf_counter()
                record = self._train_step()
                window_seconds += time.perf_counter() - start
                window_steps += 1
                profiler.after_step()
                self.step += 1
                validate = config.val_every > 0 and (self.step % config.val_every == 0 or
                                                     self.step == self.total_steps)
                if validate:
                    record["val_loss"] = self._validation_loss()
                if validate or self.step % config.log_every == 0 or self.step == self.total_steps:
                    # every step since the last record, not only this one: a slow step between records (a
                    # recompilation, a data stall) shows in the rate
                    record["tokens_per_s"] = window_steps * self.global_batch * config.seq_len / window_seconds
                    logger.log({"step": self.step, **record})
                    window_steps, window_seconds = 0, 0.0
                if any_rank(self.stop_signal is not None, world):
                    self._save()
                    self._stopped()
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
        indices = self.sampler.rank_rows(self.step, world.data_rank, world.data_size)
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
        loss, grad_norm = sum_over_ranks(total_loss, world).item() / num_targets, grad_norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # the same on every rank (summed / global)
            self._diverged(loss, grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tokens = self.global_batch * config.seq_len
        record = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": (self.step + 1) * tokens}
        if world.device.type == "cuda":  # this rank's peak since the start, for memory per GPU
            record["peak_gib"] = torch.cuda.max_memory_allocated(world.device) / 2**30
        return record

    def _held_out_rows(self) -> np.ndarray:
        """The validation rows (the corpus's last val_rows rows, never trained on), none without val_every."""
        if self.config.val_every == 0:
            return np.empty(0, dtype=np.int64)
        count = self.config.val_rows
        if count < self.world.data_size or count + self.global_batch > len(self.rows):
            raise ValueError(f"val_rows {count} must be at least the data-parallel size ({self.world.data_size}) and "
                             "leave "
                             f"{self.global_batch} rows (one step) of the corpus's {len(self.rows)} for training")
        return np.arange(len(self.rows) - count, len(self.rows))

    def _validation_loss(self) -> float:
        """Mean next-token loss over the held-out rows; every data rank scores an equal share (FSDP needs the same
        number of forward passes on each rank)."""
        world, size = self.world, self.config.micro_batch_size
        share = len(self.val_rows) // world.data_size
        mine = self.val_rows[world.data_rank * share:(world.data_rank + 1) * share]
        total = torch.zeros((), device=world.device, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(mine), size):
                total += self._loss_sum(make_batch(self.rows, mine[start:start + size], self.flatten)).double()
        scored = self.rows.num_targets(self.val_rows[:share * world.data_size], self.flatten)
        return sum_over_ranks(total, world).item() / scored

    def _loss_sum(self, batch: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The summed cross-entropy of a micro-batch's targets (-100: not counted), computed by the model itself
        (its chunked loss, without float32 logits for every token); num_items_in_batch=1 keeps it a sum, which the
        caller divides by the step's target count. Under context parallelism: the sum over this rank's slice of
        the rows (the targets are sliced after the shift, so none is lost at a slice boundary)."""
        world, device = self.world, self.world.device
        inputs: dict[str, Any] = {"input_ids": _to_device(context_shard(batch["input_ids"], world), device),
                                  "use_cache": False, "num_items_in_batch": 1,
                                  "shift_labels": _to_device(context_shard(batch["targets"], world), device)}
        if batch["cu_seqlens"] is not None:
            inputs["cu_seqlens"] = _to_device(batch["cu_seqlens"], device)
        autocast = device.type == "cuda" and self.config.precision == "bf16"
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            return self.model(**inputs).loss

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

    def _diverged(self, loss: float, grad_norm: float) -> None:
        """Stop before the optimizer applies a non-finite step: the model and checkpoints keep the last good state."""
        self.optimizer.zero_grad(set_to_none=True)
        kept = (f"the last good checkpoint, step {self.last_saved}, is kept in {self.ckpt_dir}" if self.last_saved > 0
                else "no checkpoint was saved yet")
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: loss {loss}, grad norm {grad_norm} (not applied); {kept}. "
            f"Lower --lr (now {self.config.lr}) or raise --warmup-steps, then start again or --resume",
            self.step + 1, loss)

    def _stopped(self) -> None:
        name = signal.Signals(self.stop_signal).name if self.stop_signal is not None else "signal"
        raise TrainingStopped(
            f"stopped by {name} after step {self.step} of {self.total_steps}; the checkpoint is saved in "
            f"{self.ckpt_dir}; continue with the same command and --resume", self.stop_signal or signal.SIGTERM)

    def _save(self) -> None:
        if self.step == self.last_saved:
            return
        state = {"step": self.step, "scheduler": self.scheduler.state_dict(), "data": self._data_identity(),
                 "settings": dataclasses.asdict(self.config)}
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
            # the settings it was trained with (efla eval ppl reads its seq_len as the default context)
            (folder / "train_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=2))
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
        identity = {"corpus": self.corpus_key, "seq_len": self.config.seq_len, "global_batch": self.global_batch,
                    "seed": self.config.seed}
        if len(self.val_rows):  # the rows held out change which rows the steps draw
            identity["held_out_rows"] = len(self.val_rows)
        return identity

    def _check_same_data(self, saved: dict[str, Any], path: Path) -> None:
        current = self._data_identity()
        changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume from {path}: the data differs from the checkpoint's "
                             f"(field: (checkpoint, now)) {changed}")

    def _check_same_model(self, model_cfg: Any, path: Path) -> None:
        from transformers import AutoConfig

        changes = model_config_changes(AutoConfig.from_pretrained(str(path)).to_dict(), model_cfg.to_dict())
        if changes:
            raise ValueError(f"cannot resume from {path}: the model config differs from the checkpoint's "
                             f"({describe_changes(changes)}); resume with the checkpoint's --model and "
                             "--model-overrides, or start a new run (--overwrite or another --out-dir)")

    def _apply_changed_settings(self, saved: dict[str, Any] | None) -> None:
        """Settings changed since the checkpoint take effect from here on, and are reported: the optimiser's
        hyperparameters and the learning-rate schedule (which loading the checkpoint set back to the saved ones)."""
        changes = {} if saved is None else setting_changes(saved, dataclasses.asdict(self.config))
        if not changes:
            return
        config = self.config
        matrices, others = self.optimizer.param_groups
        matrices["weight_decay"] = config.weight_decay
        for group in (matrices, others):
            group.update(betas=(config.beta1, config.beta2), eps=config.adam_eps, initial_lr=config.lr)
        self.scheduler.base_lrs = [config.lr] * 2
        step = self.scheduler.last_epoch
        for group, factor in zip((matrices, others), self.scheduler.lr_lambdas, strict=True):
            group["lr"] = config.lr * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in (matrices, others)]
        self._log(f"note: settings changed since the checkpoint apply from step {self.step + 1}: "
                  f"{describe_changes(changes)}")

    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_signal = signum

    def _on_main(self, work: Callable[[], Any]) -> Any:
        """Rank 0's ``work()`` (a check, or a choice only rank 0 makes), its result or error shared with all ranks."""
        result: tuple[Any, Exception | None] = (None, None)
        if self.world.is_main:
            try:
                result = (work(), None)
            except (ValueError, FileNotFoundError) as error:
                result = (None, error)
        value, error = from_main(result, self.world)
        if error is not None:
            raise error
        return value

    def _log(self, message: str) -> None:
        if self.world.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)  # beside the progress bar


def model_config(config: TrainConfig, tokenizer: Any) -> Any:
    """The model configuration: a preset or a config file/folder, the overrides, the tokenizer's vocabulary size
    and special tokens. Raises when seq_len is longer than the model's max_position_embeddings."""
    from transformers import AutoConfig

    from efla.models import PRESETS, EFLAConfig, preset_config

    overrides = dict(config.model_overrides)
    overrides.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        overrides.setdefault(name, getattr(tokenizer, name))
    if config.model in PRESETS:
        _check_override_keys(config.model_overrides, EFLAConfig)
        model_cfg = preset_config(config.model, **overrides)
    else:
        path = Path(config.model).expanduser()
        if not path.exists():
            raise ValueError(f"model must be a preset {sorted(PRESETS)} or a config.json / model folder "
                             f"(got {config.model!r}, which does not exist)")
        base = AutoConfig.from_pretrained(str(path))
        _check_override_keys(config.model_overrides, type(base))
        values = {**base.to_dict(), **overrides}
        # a saved bf16 model's dtype would make from_config build bf16 weights (and AdamW state): train in float32
        values.pop("dtype", None)
        values.pop("torch_dtype", None)
        model_cfg = AutoConfig.for_model(values.pop("model_type"), **values)
    check_tokenizer_fits(len(tokenizer), model_cfg.vocab_size,
                         f"raise vocab_size in --model-overrides to at least {len(tokenizer)}, or leave it out (it "
                         "then follows the tokenizer)")
    check_activation_checkpointing(model_cfg, config.activation_checkpointing)
    limit = getattr(model_cfg, "max_position_embeddings", None)
    if limit is not None and config.seq_len is not None and config.seq_len > limit:
        raise ValueError(f"seq_len {config.seq_len} is longer than the model's max_position_embeddings {limit}; "
                         f"lower --seq-len or pass --model-overrides '{{\"max_position_embeddings\": "
                         f"{config.seq_len}}}'")
    return model_cfg


def _vocab_size_note(config: TrainConfig, vocab_size: int) -> str | None:
    """One line saying that the model's vocab_size follows the tokenizer, when it differs from the one of the preset or
    config file (which the user may have read); None when it is the same or set by --model-overrides."""
    from transformers import AutoConfig

    from efla.models import PRESETS

    if "vocab_size" in config.model_overrides:
        return None
    if config.model in PRESETS:
        declared, source = PRESETS[config.model].get("vocab_size"), f"the {config.model} preset's"
    else:
        declared, source = getattr(AutoConfig.from_pretrained(str(Path(config.model).expanduser())), "vocab_size",
                                   None), f"{config.model}'s"
    if declared is None or declared == vocab_size:
        return None
    return (f"note: the model's vocab_size is {vocab_size}, the tokenizer's size ({source} is {declared}); set it with "
            f"--model-overrides '{{\"vocab_size\": N}}' (N >= {vocab_size})")


def _check_override_keys(overrides: dict[str, Any], config_class: type) -> None:
    """Reject model_overrides keys that ``config_class`` does not know (a typo would be stored and ignored)."""
    known = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    known |= set(config_class().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"model_overrides has unknown key(s) {unknown} for {config_class.__name__}; known keys: "
                         f"{sorted(k for k in known if not k.startswith('_'))}")


def _to_device(batch_tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch tensor on ``device``. To a GPU through pinned memory without waiting: a copy from pageable memory
    first waits for every kernel already queued (the previous step's optimizer), so the host could not queue the
    next forward meanwhile."""
    if device.type != "cuda":
        return batch_tensor.to(device)
    return batch_tensor.pin_memory().to(device, non_blocking=True)


def _adamw(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear, embedding, conv weights) only, not on norms or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps,
                             fused=device.type == "cuda")


def _schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int) -> Any:
    """The learning-rate schedule, one of transformers' (a LambdaLR whose state resumes exactly): linear warmup over
    warmup_steps, then cosine down to lr * min_lr_ratio, or warmup-stable-decay (the last decay_ratio of the steps
    decay, by a cosine, to lr * min_lr_ratio), or linear down to 0."""
    from transformers import get_scheduler

    kinds = {
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": config.min_lr_ratio}),
        "wsd": ("warmup_stable_decay", {"num_decay_steps": max(1, round(config.decay_ratio * total_steps)),
                                        "min_lr_ratio": config.min_lr_ratio}),
        "linear": ("linear", {}),
    }
    name, extra = kinds[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps,
                         scheduler_specific_kwargs=extra)
