"""efla eval harness: lm-evaluation-harness scores an EFLA checkpoint on the shipped local tasks, with the numbers a
direct computation gives."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("lm_eval")

from efla.cli import main
from efla.eval import TASKS_DIR, evaluate_tasks, perplexity, read_texts


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) as the harness defines it: the pair encoded whole, the context's tokens first,
    the input cut to the model's last max_length tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    num_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    targets = whole[num_context:]
    inputs = whole[-(model.config.max_position_embeddings + 1):-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(targets):].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(targets)[:, None]).sum().item()


@pytest.fixture(scope="module")
def results(checkpoint) -> dict:
    return evaluate_tasks(checkpoint, ["efla_smoke_mc", "efla_smoke_ppl"], batch_size=4, device="cpu",
                          builtin_tasks=False)["results"]


def test_multiple_choice_accuracy_matches_direct_scoring(results, model, tokenizer):
    records = [json.loads(line) for line in (TASKS_DIR / "efla_smoke_mc.jsonl").read_text().splitlines()]
    assert len(records) == results["efla_smoke_mc"]["sample_len"]
    correct = correct_norm = 0
    for record in records:
        context = f"Question: {record['question']}\nAnswer:"
        scores = [_loglikelihood(model, tokenizer, context, " " + choice) for choice in record["choices"]]
        normed = [score / len(choice) for score, choice in zip(scores, record["choices"], strict=True)]
        correct += max(range(len(scores)), key=scores.__getitem__) == record["answer"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == record["answer"]
    assert results["efla_smoke_mc"]["acc,none"] == pytest.approx(correct / len(records))
    assert results["efla_smoke_mc"]["acc_norm,none"] == pytest.approx(correct_norm / len(records))


def test_rolling_perplexity_matches_efla_perplexity(results, model, tokenizer):
    """The harness's loglikelihood_rolling windows are efla.eval.perplexity's with stride == context, from eos."""
    texts = read_texts([TASKS_DIR / "efla_smoke_ppl.jsonl"])
    ours = perplexity(model, tokenizer, texts)
    assert ours.tokens > 2 * model.config.max_position_embeddings * len(texts)  # several windows per document
    harness = results["efla_smoke_ppl"]
    assert harness["bits_per_byte,none"] == pytest.approx(ours.bits_per_byte, rel=1e-5)
    assert harness["byte_perplexity,none"] == pytest.approx(2**ours.bits_per_byte, rel=1e-5)
    words = sum(len(text.split()) for text in texts)
    assert harness["word_perplexity,none"] == pytest.approx(math.exp(ours.nll / words), rel=1e-4)


def test_unknown_task_and_bad_model_give_clear_errors(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task.* no_such_task .*switched off"):
        evaluate_tasks(checkpoint, ["no_such_task"], device="cpu", builtin_tasks=False)
    with pytest.raises(FileNotFoundError, match=r"model folder .*nowhere does not exist"):
        evaluate_tasks(tmp_path / "nowhere", ["efla_smoke_mc"], device="cpu", builtin_tasks=False)


def test_cli_with_include_path_limit_and_output(checkpoint, tmp_path, capsys):
    """A task from --include-path (a copy of the shipped one under a new name), --limit, and the JSON output."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("local_data.py", "efla_smoke_mc.jsonl"):
        (tasks / name).write_text((TASKS_DIR / name).read_text())
    yaml = (TASKS_DIR / "efla_smoke_mc.yaml").read_text().replace("task: efla_smoke_mc", "task: my_mc")
    (tasks / "my_mc.yaml").write_text(yaml)
    out = tmp_path / "harness.json"
    main(["eval", "harness", "--model", str(checkpoint), "--tasks", "my_mc", "--include-path", str(tasks),
          "--no-builtin-tasks", "--limit", "2", "--num-fewshot", "1", "--batch-size", "2", "--device", "cpu",
          "--output", str(out)])
    record = json.loads(out.read_text())
    assert record["results"]["my_mc"]["sample_len"] == 2
    assert record["n-shot"]["my_mc"] == 1
    assert "my_mc" in capsys.readouterr().out
