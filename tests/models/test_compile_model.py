"""The model under torch.compile: each block compiled (as ``efla train`` does) gives eager's loss and gradients, a
block on packed documents traces as one graph (no host sync in the layer: the Triton pipelines and the short
convolution are custom ops, the argument checks read metadata only), and the whole model compiles as one graph on
plain, padded and packed batches (as transformers' Trainer compiles it with torch_compile=True)."""

from __future__ import annotations

import pytest
import torch
from helpers import kept_for_backward, rel_err, require_triton_kernels, storage_bytes

from efla.models import EFLAForCausalLM, preset_config


def _loss_and_grads(model: EFLAForCausalLM, ids: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_blocks_compiled_with_inductor_equal_eager(checkpointing):
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = preset_config("tiny", attn_backend="torch", chunk_size=16)
    model = EFLAForCausalLM(config).train()
    if checkpointing != "none":  # applied before compiling, as the trainer does
        model.activation_checkpointing_enable({"policy": checkpointing})
    ids = torch.randint(0, config.vocab_size, (2, 48))
    loss, grads = _loss_and_grads(model, ids)
    for block in model.model.layers:
        block.compile(backend="inductor")
    compiled_loss, compiled_grads = _loss_and_grads(model, ids)
    assert rel_err(compiled_loss, loss) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(compiled_grads, grads, strict=True)) < 1e-3


def test_compiled_blocks_keep_no_more_for_the_backward_than_eager_blocks():
    """Inductor's partitioner, left to itself, kept the normalised inputs of the projections and the SwiGLU product
    that the eager functions recompute (a third more memory for the 340M model in bfloat16). The functions' regions
    are recomputed under compile too, but for their matrix products."""
    device = require_triton_kernels()
    torch._dynamo.reset()
    torch.manual_seed(2)
    config = preset_config("tiny", num_hidden_layers=1, hidden_size=128, num_heads=2, intermediate_size=192,
                           attn_backend="triton")
    block = EFLAForCausalLM(config).to(device, torch.bfloat16).model.layers[0]
    x = torch.randn(2, 256, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    _, eager = kept_for_backward(lambda: block(x, None, None, None))
    compiled_block = torch.compile(block, backend="inductor")
    _, compiled = kept_for_backward(lambda: compiled_block(x, None, None, None))
    assert storage_bytes(compiled) <= storage_bytes(eager), (compiled, eager)
    product = [t.shape for t in compiled.values() if t.numel() == 2 * 256 * config.intermediate_size]
    assert not product  # silu(gate) * up [tokens, intermediate] is formed again in the backward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's CUDA lowerings need a GPU")
def test_compiled_340m_blocks_keep_no_more_for_the_backward_than_eager_on_a_gpu():
    """At the 340M preset's widths, in bfloat16, with the Triton kernels and Inductor's CUDA code: what a compiled
    block keeps for its backward is at most what the eager block keeps."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    config = preset_config("340M", num_hidden_layers=1)
    block = EFLAForCausalLM(config).to("cuda", torch.bfloat16).model.layers[0]
    x = torch.randn(2, 2048, config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _, eager = kept_for_backward(lambda: block(x, None, None, None))
    compiled_block = torch.compile(block, backend="inductor")
    _, compiled = kept_for_backward(lambda: compiled_block(x, None, None, None))
    assert storage_bytes(compiled) <= storage_bytes(eager)


@pytest.mark.gpu
@pytest.mark.parametrize("fields", [{"attn_mode": "efla"}, {"attn_mode": "delta"},
                                    {"attn_mode": "efla", "use_decay_gate": True}, {"attn_layers": [1]}],
                         ids=["efla", "delta", "gated-efla", "hybrid"])
def test_blocks_compiled_with_inductor_on_packed_documents_equal_eager(fields):
    """What ``efla train`` runs on a GPU: Inductor-compiled blocks on packed documents give eager's loss and
    gradients, and the attention contributes (its gradients are not zero). Inductor's own searchsorted once put every
    token one document too far (pytorch/pytorch#182343), which zeroed the short convolution's output, so compiled
    training learned no attention at all while its loss still fell; aot_eager does not lower the op and missed it."""
    if not torch.cuda.is_available():
        pytest.skip("Inductor's CUDA lowerings need a GPU")
    torch._dynamo.reset()
    torch.manual_seed(3)
    config = preset_config("tiny", **fields)
    model = EFLAForCausalLM(config).cuda().train()
    ids = torch.randint(0, config.vocab_size, (2, 512), device="cuda")
    cu_seqlens = torch.tensor([0, 100, 101, 700, 1024], device="cuda", dtype=torch.int32)
    loss, grads = _loss_and_grads(model, ids, cu_seqlens)
    for block in model.model.layers:
        block.compile(backend="inductor")
    compiled_loss, compiled_grads = _loss_and_grads(model, ids, cu_seqlens)
    assert rel_err(compiled_loss, loss) < 1e-4
    names = [name for name, _ in model.named_parameters()]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, compiled_grads, grads, strict=True)}
    assert max(errors.values()) < 1e-2, errors
    attention = [g for n, g in zip(names, compiled_grads, strict=True) if ".attn.q_proj" in n]
    assert all(g.norm() > 0 for g in attention)


def test_block_on_packed_documents_is_one_graph():
    device = require_triton_kernels()
    torch._dynamo.reset()
    torch.manual_seed(1)
    config = preset_config("tiny", attn_backend="triton")
    model = EFLAForCausalLM(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (1, 70), device=device)
    cu_seqlens = torch.tensor([0, 9, 40, 70], device=device, dtype=torch.int32)
    loss, grads = _loss_and_grads(model, ids, cu_seqlens)
    for block in model.model.layers:
        block.compile(backend="aot_eager", fullgraph=True)  # fullgraph: any graph break is an error
    compiled_loss, compiled_grads = _loss_and_grads(model, ids, cu_seqlens)
    assert rel_err(compiled_loss, loss) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(compiled_grads, grads, strict=True)) < 1e-4


@pytest.mark.parametrize("attn_backend", ["torch", "triton"])
def test_new_document_counts_do_not_recompile(attn_backend):
    """Packed batches with a different number of documents each run the compiled blocks without a recompilation
    (the trainer's batches do; each recompilation costs seconds to minutes): the model traces cu_seqlens's length as a
    symbol from the first batch, and the reference backend, which reads the lengths on the host, runs outside the
    graph. (A batch of a single document compiles its own graph once on the CPU: the convolution's packed path
    specialises on one sequence.)"""
    device = require_triton_kernels() if attn_backend == "triton" else "cpu"
    torch._dynamo.reset()
    torch.manual_seed(2)
    config = preset_config("tiny", attn_backend=attn_backend, chunk_size=16 if attn_backend == "torch" else 64)
    model = EFLAForCausalLM(config).to(device).train()
    for block in model.model.layers:
        block.compile(backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for cuts in ([0, 30, 70], [0, 9, 40, 70], [0, 5, 20, 33, 61, 70], [0, 50, 70]):
            ids = torch.randint(0, config.vocab_size, (1, 70), device=device)
            cu_seqlens = torch.tensor(cuts, device=device, dtype=torch.int32)
            loss = model(ids, labels=ids, cu_seqlens=cu_seqlens).loss
            loss.backward()
            assert torch.isfinite(loss)


@pytest.mark.parametrize("batch", ["plain", "padded", "packed"])
def test_whole_model_compiled_with_fullgraph_equals_eager(batch):
    """torch.compile(model, fullgraph=True) with Inductor: any graph break is an error, and the loss equals eager's.
    A padding mask is unpadded with shapes that follow the batch alone, and packed documents mark no dynamic
    dimension inside the traced forward. Padded and packed batches run the Triton backend (its kernels are custom ops;
    in the interpreter on CPU): the torch backend reads packed sequence lengths on the host, outside the graph."""
    attn_backend = "torch" if batch == "plain" else "triton"
    device = require_triton_kernels() if attn_backend == "triton" else "cpu"
    torch._dynamo.reset()
    torch.manual_seed(5)
    config = preset_config("tiny", attn_backend=attn_backend, chunk_size=16 if attn_backend == "torch" else 64)
    model = EFLAForCausalLM(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (2, 40), device=device)
    inputs = {"input_ids": ids, "labels": ids}
    if batch == "padded":
        mask = torch.ones_like(ids)
        mask[0, :7] = 0  # left padding
        mask[1, 33:] = 0  # right padding
        inputs.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    elif batch == "packed":
        inputs.update(input_ids=ids[:1], labels=ids[:1],
                      cu_seqlens=torch.tensor([0, 9, 25, 40], device=device, dtype=torch.int32))
    eager = model(**inputs).loss
    compiled = torch.compile(model, backend="inductor", fullgraph=True)(**inputs).loss
    assert rel_err(compiled, eager) < 1e-5
