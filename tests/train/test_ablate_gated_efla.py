"""scripts/ablate_gated_efla.py: each ablation changes a gated EFLA model's outputs while it is active and not after,
and a toy run trains, scores and refuses to overwrite its folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")


def _strongly_gated_model():
    from efla.models import EFLAForCausalLM, preset_config

    torch.manual_seed(0)
    model = EFLAForCausalLM(preset_config("tiny", use_decay_gate=True, attn_backend="torch", chunk_size=4)).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("A_log"):
            parameter.data.fill_(3.0)  # a decay of about -exp(3) * softplus(...) per token: eta far below alpha
    return model


@pytest.mark.parametrize("name", ["eta-is-alpha", "unit-keys"])
def test_each_ablation_changes_the_model_only_while_active(load_script, name):
    ablate = load_script("scripts/ablate_gated_efla.py")
    model = _strongly_gated_model()
    ids = torch.randint(1, 256, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
        with ablate.ablation(name):
            during = model(ids).logits
        after = model(ids).logits
    assert (during - before).abs().max() > 1e-3
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="ablation must be one of"), ablate.ablation("gates-off"):
        pass


def test_a_toy_ablation_trains_scores_and_keeps_its_folder(corpus, tokenizer_dir, load_script, tmp_path, capsys):
    lines = (corpus / "docstrings.jsonl").read_text().splitlines()
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines[:-4]) + "\n")
    (data / "test.jsonl").write_text("\n".join(lines[-4:]) + "\n")
    ablate = load_script("scripts/ablate_gated_efla.py")
    argv = ["--ablation", "unit-keys", "--corpus", str(data), "--tokenizer", str(tokenizer_dir), "--out",
            str(tmp_path / "run"), "--hidden-size", "32", "--layers", "1", "--heads", "1", "--seq-len", "32",
            "--batch", "4", "--max-tokens", "512", "--warmup-steps", "1"]
    perplexity = ablate.main(argv)
    assert math.isfinite(perplexity) and 1.0 < perplexity < 1e4
    assert "unit-keys: test perplexity" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "ablation.json").read_text())["ablation"] == "unit-keys"
    with pytest.raises(SystemExit) as stop:
        ablate.main(argv)
    assert stop.value.code == 2 and "holds a finished run; choose a new folder" in capsys.readouterr().err

    # stopped after training, before its score: the same command scores it (with the ablation) and trains nothing
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    (tmp_path / "run" / "ppl_test.json").unlink()
    assert ablate.main(argv) == pytest.approx(perplexity, rel=1e-6)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics
    # the other ablation, or a folder whose training did not finish, is refused
    for folder, name in ((tmp_path / "run", "eta-is-alpha"), (tmp_path / "half", "unit-keys")):
        folder.mkdir(exist_ok=True)
        (folder / "ppl_test.json").unlink(missing_ok=True)
        other = list(argv)
        other[other.index("--ablation") + 1], other[other.index("--out") + 1] = name, str(folder)
        with pytest.raises(SystemExit) as stop:
            ablate.main(other)
        assert stop.value.code == 2 and "holds no finished training" in capsys.readouterr().err
