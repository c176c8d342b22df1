"""Checkpoint folders: pruning keeps the checkpoint just written."""

from __future__ import annotations

import torch

from efla.models import preset_config
from efla.models.modeling_efla import EFLAForCausalLM
from efla.train.checkpoint import find_checkpoint, save_checkpoint
from efla.train.distributed import World


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A resume from step 5 while step 10 is on disk (or a new run in an old out_dir) with keep=1: the new step 7
    survives and ``latest`` names it."""
    model = EFLAForCausalLM(preset_config("tiny", num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters())
    world = World(rank=0, size=1, device=torch.device("cpu"))
    for step in (5, 10):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, world, keep=2)
    save_checkpoint(tmp_path, 7, model, optimizer, {"step": 7}, world, keep=1)
    latest = find_checkpoint("latest", tmp_path)
    assert latest.name == "step_00000007" and (latest / "trainer_state.pt").is_file()
    assert not (tmp_path / "step_00000005").exists()
