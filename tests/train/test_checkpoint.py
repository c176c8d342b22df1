"""Checkpoint folders: pruning keeps the checkpoint just written; checksums find damage."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from efla.models import preset_config
from efla.models.modeling_efla import EFLAForCausalLM
from efla.train.checkpoint import checkpoint_problem, find_checkpoint, save_checkpoint
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


def test_checksums_find_damage_and_latest_falls_back(tmp_path):
    """Every file of a checkpoint has its SHA-256 in checksums.json; a changed byte or a missing file marks the
    checkpoint damaged, and "latest" then resolves to the newest intact one (the damaged one set aside)."""
    model = EFLAForCausalLM(preset_config("tiny", num_hidden_layers=1))
    optimizer = torch.optim.AdamW(model.parameters())
    world = World(rank=0, size=1, device=torch.device("cpu"))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, optimizer, {"step": step}, world, keep=3)
    listed = json.loads((tmp_path / "step_00000003" / "checksums.json").read_text())
    assert set(listed) == {"model.safetensors", "config.json", "optimizer.pt", "trainer_state.pt", "rng_rank0.pt"}
    assert all(checkpoint_problem(tmp_path / f"step_{s:08d}") is None for s in (1, 2, 3))
    data = bytearray((tmp_path / "step_00000003" / "config.json").read_bytes())
    data[-3] ^= 1
    (tmp_path / "step_00000003" / "config.json").write_bytes(bytes(data))
    (tmp_path / "step_00000002" / "rng_rank0.pt").unlink()
    assert checkpoint_problem(tmp_path / "step_00000003") == "config.json differs from its checksum"
    assert checkpoint_problem(tmp_path / "step_00000002") == "no rng_rank0.pt"
    notes = []
    assert find_checkpoint("latest", tmp_path, notes.append) == tmp_path / "step_00000001"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001", "step_00000002.damaged",
                                                           "step_00000003.damaged"]
    assert len(notes) == 3 and notes[-1] == "resuming from step_00000001, the newest intact checkpoint"
    shutil.rmtree(tmp_path / "step_00000001")
    with pytest.raises(FileNotFoundError, match="no intact checkpoint"):
        find_checkpoint("latest", tmp_path, notes.append)
