"""Triton kernels for EFLA / the delta rule; ``backend.triton_attention`` is the backend behind ``efla_attention``.

Chunk kernels (``tiles.CHUNK`` = 64 tokens per chunk) for training and long prompts: ``wy.py`` (the WY system and the
pass that writes it), ``chunk_fwd.py`` (state and output passes), ``chunk_bwd.py`` (reverse state pass, per-chunk
gradients). ``fused_recurrent.py`` serves inference on short sequences (T <= 64, decode steps). Each file holds its
kernels and the launcher of each. What the kernels share is public: ``tiles.py`` (where a program's tiles live, the
chunk length), ``step_sizes.py`` (alpha and the write step in-kernel), ``decay.py`` (the decay gate's per-chunk sums)
and the WY system of ``wy.py``. ``op.py`` chains the launchers into ``torch.library`` custom ops (forward, backward,
decode); ``plan.py`` maps chunks to packed sequences; ``launch.py`` holds the launch defaults and ``settings.py`` the
settings a caller passes in (``kernel_settings``: float32 dot precision, launch overrides, whether T is kept). The
references they are tested against are ``efla/ops/chunk.py`` and ``efla/ops/recurrent.py``.

Every kernel works on sequences packed along T: equal-length batches are viewed as B sequences of T tokens, so one
code path serves both layouts. This package imports nothing by itself, so that ``settings`` can be used without
loading Triton.
"""
