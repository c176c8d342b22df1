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
