"""Rank 0's record of a run: a tqdm progress bar, ``metrics.jsonl`` (one JSON record per logged step), TensorBoard
when it is installed (a notice says so when it is not) and, with ``--wandb``, Weights & Biases (``WANDB_MODE=offline``
writes the run under ``out_dir/wandb`` without network; ``wandb sync`` uploads it later)."""

from __future__ import annotations

import importlib.util
import json
import secrets
import sys
from pathlib import Path
from typing import Any

_BAR_FIELDS = {"loss": ".4f", "val_loss": ".4f", "lr": ".2e", "grad_norm": ".3f", "tokens_per_s": ".0f"}


class MetricsLogger:
    """Writes each logged step's record to every output. Only rank 0 (``enabled``) writes anything."""

    def __init__(self, out_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 wandb_project: str | None = None, settings: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.file = (out_dir / "metrics.jsonl").open("a")
        self.writer = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        else:
            tqdm.write("note: TensorBoard is not installed (pip install tensorboard), so metrics go to "
                       f"{out_dir / 'metrics.jsonl'} only", file=sys.stderr)
        self.wandb = None if wandb_project is None else _start_wandb(out_dir, wandb_project, settings or {})

    def log(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = int(record["step"])
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix({name: f"{record[name]:{spec}}" for name, spec in _BAR_FIELDS.items() if name in record})
        values = {f"train/{name}": value for name, value in record.items() if name != "step"}
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.file.close()
            if self.writer is not None:
                self.writer.close()
            if self.wandb is not None:
                self.wandb.finish()


def _start_wandb(out_dir: Path, project: str, settings: dict[str, Any]) -> Any:
    """A W&B run under ``out_dir/wandb``; a resumed run continues the same W&B run (its id is kept in
    ``out_dir/wandb/run_id``)."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError("--wandb needs the wandb package: pip install wandb") from error
    folder = out_dir / "wandb"
    folder.mkdir(parents=True, exist_ok=True)
    id_file = folder / "run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=project, dir=str(out_dir), id=run_id, resume="allow", name=out_dir.name,
                      config=settings)
