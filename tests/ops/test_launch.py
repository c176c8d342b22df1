"""Launch settings of the Triton kernels: the defaults never use the settings Triton 3.6 miscompiled on an H200,
overrides apply (capped at V) inside their ``kernel_settings`` block only, a typo in a kernel name is an error, and
the multiprocessor count is read per device."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from efla.ops.triton import launch
from efla.ops.triton.settings import KernelSettings, Launch, active_settings, kernel_settings

HEAD_DIMS = (16, 32, 64, 128, 256)


@pytest.mark.parametrize(("K", "V", "dtype_bytes", "gated"),
                         list(itertools.product(HEAD_DIMS, HEAD_DIMS, (2, 4), (False, True))))
def test_defaults_avoid_the_miscompiled_settings(K, V, dtype_bytes, gated):
    for kernel in launch.KERNELS:
        cfg = launch.launch(kernel, K, V, dtype_bytes, gated=gated)
        assert 1 <= cfg.bv <= V and cfg.bv & (cfg.bv - 1) == 0, (kernel, cfg)
        if kernel in ("state_fwd", "state_bwd"):  # wrong results / illegal addresses: 4 warps, 1 stage, bv <= 32
            assert not (cfg.warps == 4 and cfg.stages == 1 and cfg.bv <= 32), (kernel, K, V, cfg)
        if K <= 16 or V <= 16:  # K = 16 products on 4-8 warps gave wrong outputs
            assert cfg.warps <= 2 or kernel in ("state_fwd", "state_bwd"), (kernel, K, V, cfg)


def test_overrides_replace_the_default_inside_their_block_and_are_capped_at_V():
    default_out, default_wy = launch.launch("out", 128, 32, 2), launch.launch("wy_fwd", 128, 32, 2)
    with kernel_settings(launch_overrides={"out": Launch(bv=128, warps=8, stages=1)}):
        assert launch.launch("out", 128, 32, 2) == Launch(32, 8, 1)
        assert launch.launch("wy_fwd", 128, 32, 2) == default_wy
    assert launch.launch("out", 128, 32, 2) == default_out != Launch(32, 8, 1)


def test_settings_blocks_nest_and_restore_even_on_error():
    assert active_settings() == KernelSettings()
    with pytest.raises(RuntimeError, match="inside"), kernel_settings(save_t=False) as outer:
        assert not outer.save_t and outer.fp32_dot_precision == "tf32x3"
        with kernel_settings(fp32_dot_precision="ieee") as inner:  # changes apply to the settings in force
            assert active_settings() is inner and not inner.save_t and inner.fp32_dot_precision == "ieee"
        assert active_settings() is outer
        raise RuntimeError("inside")
    assert active_settings() == KernelSettings()
    with kernel_settings(KernelSettings(save_t=False)):
        assert not active_settings().save_t


def test_settings_refuse_what_no_kernel_reads():
    with pytest.raises(ValueError, match="fp32_dot_precision must be one of"):
        KernelSettings(fp32_dot_precision="tf32")
    with pytest.raises(ValueError, match="unknown kernel 'stat_fwd'"):
        KernelSettings(launch_overrides={"stat_fwd": Launch(32, 4, 2)})
    with pytest.raises(TypeError, match="must be a Launch"):
        KernelSettings(launch_overrides={"out": (32, 4, 2)})
    overrides = {"out": Launch(32, 4, 2)}
    settings = KernelSettings(launch_overrides=overrides)
    overrides["wy_fwd"] = Launch(32, 4, 2)  # the caller's dict is copied, and the settings' copy is read-only
    assert list(settings.launch_overrides) == ["out"]
    with pytest.raises(TypeError):
        settings.launch_overrides["wy_fwd"] = Launch(32, 4, 2)


def test_unknown_kernel_is_an_error():
    with pytest.raises(ValueError, match="unknown kernel 'stat_fwd'"):
        launch.launch("stat_fwd", 64, 64, 2)


def test_multiprocessors_are_read_per_device(monkeypatch):
    """Two GPUs of different sizes in one process: each launch is sized by the device it runs on, not the first."""
    counts = {0: 132, 1: 78}
    current = [0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(multi_processor_count=counts[index]))
    launch._multiprocessors_of.cache_clear()
    try:
        assert launch.multiprocessors() == 132
        current[0] = 1
        assert launch.multiprocessors() == 78
        current[0] = 0
        assert launch.multiprocessors() == 132
    finally:
        launch._multiprocessors_of.cache_clear()


@pytest.mark.parametrize(("K", "V", "dtype_bytes"), list(itertools.product(HEAD_DIMS, HEAD_DIMS, (2, 4))))
def test_low_parallelism_splits_v_only_where_it_stays_safe(K, V, dtype_bytes, monkeypatch):
    """Few (sequence, head) pairs on a 132-multiprocessor GPU: state passes at K <= 128 split V to 32 on 4 warps and
    2 stages; 16-bit inputs whose programs then fit in one wave go down to 16 while they still do, with deeper
    pipelines; never a setting that miscompiled; a full GPU keeps the default."""
    monkeypatch.setattr(launch, "multiprocessors", lambda: 132)
    for kernel in ("state_fwd", "state_bwd"):
        default = launch.launch(kernel, K, V, dtype_bytes)
        assert launch.launch(kernel, K, V, dtype_bytes, sequences_x_heads=512) == default
        splits = K <= 128 and default.bv == 64 and default.stages >= 2
        stages = 4 if kernel == "state_fwd" else 3
        for pairs in (8, 32, 64):
            few = launch.launch(kernel, K, V, dtype_bytes, sequences_x_heads=pairs)
            assert not (few.warps == 4 and few.stages == 1 and few.bv <= 32), (kernel, K, V, few)
            one_wave = pairs * -(-V // 32) <= 132
            if not splits or pairs * -(-V // 64) >= 132:
                expected = default
            elif dtype_bytes == 4 or not one_wave:
                expected = Launch(32, 4, 2)
            else:  # halve while pairs x V-blocks <= 132
                finest = 32 if pairs * -(-V // 16) > 132 else 16
                expected = Launch(finest, 4, stages)
            assert few == expected, (kernel, K, V, pairs, few)


def test_reverse_state_pass_takes_its_own_settings_when_gated():
    """The 8-warp, 3-stage reverse pass was tuned ungated; the gated form at bf16 K = V = 128 runs the gated tuning's
    (32, 4, 2) on a full GPU, and with few (sequence, head) pairs still splits V down to 16 with 3 stages."""
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=512) == Launch(64, 8, 3)
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=512, gated=True) == Launch(32, 4, 2)
    assert launch.launch("state_bwd", 64, 64, 2, sequences_x_heads=512, gated=True) == Launch(64, 4, 3)


def test_gated_reverse_pass_fills_the_gpu_from_its_tuned_block(monkeypatch):
    """From the gated V-block of 32: split to 16 (3 stages) while pairs x 8 blocks fit in one wave of 132, deeper
    pipeline at 32 while pairs x 4 do, the tuned setting once they cover the GPU."""
    monkeypatch.setattr(launch, "multiprocessors", lambda: 132)
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=8, gated=True) == Launch(16, 4, 3)
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=64, gated=True) == Launch(32, 4, 2)
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=33, gated=True) == Launch(32, 4, 2)
    assert launch.launch("state_bwd", 128, 128, 2, sequences_x_heads=32, gated=True) == Launch(32, 4, 3)


def test_output_joins_the_state_pass_only_at_small_keys_on_a_full_gpu(monkeypatch):
    """K <= 64 with the state pass's programs covering the 132 multiprocessors: the output is formed in the state
    pass; with fewer programs (long context at small batch) or at K = 128 the output pass runs after it."""
    monkeypatch.setattr(launch, "multiprocessors", lambda: 132)
    assert launch.output_in_state_pass(64, 64, 2, sequences_x_heads=8 * 32)
    assert launch.output_in_state_pass(32, 32, 4, sequences_x_heads=132)
    assert not launch.output_in_state_pass(64, 64, 2, sequences_x_heads=16)
    assert not launch.output_in_state_pass(64, 64, 2, sequences_x_heads=131)
    assert not launch.output_in_state_pass(128, 128, 2, sequences_x_heads=8 * 16)
