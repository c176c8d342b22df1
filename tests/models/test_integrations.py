"""The EFLA model on the transformers and PEFT paths people already use: Trainer with gradient accumulation, the
padding-free DataCollatorWithFlattening, LoRA with the standard q/k/v/o targets, return_dict=False."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from efla.models import EFLAForCausalLM, preset_config  # noqa: E402

ATOL = 1e-5


def _model(**overrides) -> EFLAForCausalLM:
    torch.manual_seed(0)
    return EFLAForCausalLM(preset_config("tiny", initializer_range=0.1, chunk_size=4, **overrides))


def _documents(lengths: list[int]) -> list[torch.Tensor]:
    return [torch.randint(1, 256, (n,)) for n in lengths]


class _GradientCatcher(transformers.TrainerCallback):
    """Copies every parameter's gradient just before the optimizer step (after accumulation, before clipping)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.clone() for name, p in model.named_parameters()}


def test_trainer_gradient_accumulation_equals_one_batch(tmp_path):
    """Trainer with gradient_accumulation_steps=4 over sequences of different lengths: the logged loss and the
    accumulated gradients are those of the mean token loss over all 4 sequences at once (num_items_in_batch)."""
    model = _model()
    reference = _model()
    documents = _documents([3, 9, 5, 12])
    dataset = [{"input_ids": d, "labels": d} for d in documents]
    catcher = _GradientCatcher()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=1,
        logging_steps=1, max_grad_norm=0.0, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, callbacks=[catcher])
    trainer.train()

    reference.train()
    total = sum(F.cross_entropy(reference(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in documents)
    loss = total / sum(len(d) - 1 for d in documents)
    loss.backward()
    logged = next(record["loss"] for record in trainer.state.log_history if "loss" in record)
    assert abs(logged - loss.item()) < 1e-4 * loss.item()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(catcher.grads[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("flash_kwargs", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"num_hidden_layers": 3, "attn_layers": [1]}])
def test_flattening_collator_keeps_documents_apart(flash_kwargs, overrides):
    """DataCollatorWithFlattening's position_ids (or cu_seq_lens_q with return_flash_attn_kwargs) become cu_seqlens:
    each document's logits are its own, and the loss averages the within-document predictions."""
    model = _model(**overrides).eval()
    documents = _documents([5, 11, 1, 7])
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = collator([{"input_ids": d.tolist(), "labels": d.tolist()} for d in documents])
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    with torch.no_grad():
        out = model(**batch)
        alone = [model(d[None], labels=d[None]) for d in documents]
    torch.testing.assert_close(out.logits[0], torch.cat([a.logits[0] for a in alone]), atol=ATOL, rtol=0)
    expected = sum(a.loss * (len(d) - 1) for a, d in zip(alone, documents, strict=True) if len(d) > 1) / 20
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def test_position_ids_over_several_rows_restart_each_row():
    """position_ids [B, T] with restarts: the rows are read one after the other, every row and restart a document."""
    model = _model().eval()
    documents = _documents([4, 6, 10])
    ids = torch.stack([torch.cat(documents[:2]), documents[2]])
    position_ids = torch.stack([torch.cat([torch.arange(4), torch.arange(6)]), torch.arange(10)])
    with torch.no_grad():
        logits = model(ids, position_ids=position_ids).logits
        alone = torch.cat([model(d[None]).logits[0] for d in documents])
    torch.testing.assert_close(logits.flatten(0, 1), alone, atol=ATOL, rtol=0)


def test_lora_with_standard_targets_adapts_q_k_v_and_o():
    """LoRA on ["q_proj", "k_proj", "v_proj", "o_proj"] wraps all four projections of every layer, and each
    adapter gets a gradient."""
    peft = pytest.importorskip("peft")
    model = _model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    for layer in lora.base_model.model.model.layers:
        for name in targets:
            assert isinstance(getattr(layer.attn, name), peft.tuners.lora.LoraLayer), name
    trainable = {n: p for n, p in lora.named_parameters() if p.requires_grad}
    hidden, r, layers = 64, 4, 2
    assert sum(p.numel() for p in trainable.values()) == layers * len(targets) * 2 * r * hidden
    ids = torch.randint(1, 256, (2, 10))
    lora(input_ids=ids, labels=ids).loss.backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_return_dict_false_gives_a_tuple_and_output_attentions_warns():
    model = _model().eval()
    ids = torch.randint(1, 256, (2, 8))
    with torch.no_grad():
        as_dict = model(ids, labels=ids)
        as_tuple = model(ids, labels=ids, return_dict=False)
        backbone = model.model(ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(backbone, tuple)
    assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)
    assert torch.equal(backbone[0], model.model(ids).last_hidden_state)
    with pytest.warns(UserWarning, match="output_attentions"):
        out = model(ids, output_attentions=True)
    assert out.attentions is None


def test_lora_on_the_head_trains_through_its_adapter():
    """A head wrapped by an adapter is run as a module (its weight alone would skip the adapter): the loss equals
    the cross-entropy of the wrapped head's logits, and the adapter gets a gradient."""
    peft = pytest.importorskip("peft")
    model = _model()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    lora.train()
    ids = torch.randint(1, 256, (2, 9))
    out = lora(input_ids=ids, labels=ids)
    plain = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, plain, atol=0, rtol=1e-6)
    out.loss.backward()
    adapters = [p for n, p in lora.named_parameters() if "lora_" in n]
    assert adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
