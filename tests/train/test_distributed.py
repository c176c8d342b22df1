"""Process-group helpers: the device each rank computes on."""

from __future__ import annotations

import torch

from efla.train.distributed import init_world


def test_cuda_without_index_means_this_ranks_gpu(monkeypatch):
    chosen = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for device in ("cuda", "auto"):
        world = init_world(device)
        assert world.device == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1)] * 2
    assert init_world("cuda:0").device == torch.device("cuda", 0)


def test_parallelize_compiles_the_decoder_layers(monkeypatch):
    """The blocks are model.model.layers, found by walking the model, not by class names (_no_split_modules)."""
    from torch import nn

    from efla.models import EFLAForCausalLM, preset_config
    from efla.train.distributed import World, parallelize

    model = EFLAForCausalLM(preset_config("tiny", num_hidden_layers=3))
    model._no_split_modules = None  # no class names to go by
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *args, **kwargs: compiled.append(self))
    world = World(rank=0, size=1, device=torch.device("cpu"))
    assert parallelize(model, "ddp", world, compile_blocks=True) is model
    assert compiled == list(model.model.layers)
