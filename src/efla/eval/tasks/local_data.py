"""Load the jsonl files next to these task configs as a datasets split, so the tasks need no hub access.

lm-eval imports this file by path (``custom_dataset: !function local_data.load_jsonl``) and calls the loader with the
task's ``dataset_kwargs`` and ``metadata`` as keywords.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets


def load_jsonl(data_file: str, split: str = "test", **_: Any) -> datasets.DatasetDict:
    """The records of ``data_file`` (relative to this folder, one JSON object a line) as the split ``split``."""
    path = Path(__file__).parent / data_file
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})
