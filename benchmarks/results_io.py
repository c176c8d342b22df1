"""Result rows of the benchmarks: one JSON object per line, one dated file per benchmark run in benchmarks/results/.

Every row carries what makes it comparable: ``benchmark`` (the script's name), ``date``, ``device`` (the GPU's name,
or "cpu"), ``versions`` (torch, triton, fla-core, transformers where installed), ``commit`` (the tree measured, when
run from a git checkout) and ``command``, then the benchmark's own keys (shape, variant, ...) and its measured
medians. ``benchmarks/report.py`` writes the documents' tables from these files.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = {"torch": "torch", "triton": "triton", "fla": "fla-core", "transformers": "transformers"}


def software_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on (without importing them)."""
    versions = {}
    for name, distribution in PACKAGES.items():
        try:
            versions[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return versions


def current_commit() -> str | None:
    """Short hash of the checkout's HEAD, with "+dirty" when tracked files differ from it; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=root, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def device_slug(device: str) -> str:
    """A short file-name form of a device name: "NVIDIA H200" -> "h200", "NVIDIA H100 80GB HBM3" -> "h100"."""
    words = [w for w in re.split(r"[^a-z0-9]+", device.lower()) if w and w not in ("nvidia", "geforce", "tesla")]
    return words[0] if words else "unknown"


def new_results_path(benchmark: str, device: str, day: str, directory: Path = RESULTS) -> Path:
    """``directory/DAY_DEVICE_BENCHMARK.jsonl``, or ``..._2.jsonl``, ``_3``... when a run of that day already has it."""
    stem = f"{day}_{device_slug(device)}_{benchmark}"
    path, run = directory / f"{stem}.jsonl", 1
    while path.exists():
        run += 1
        path = directory / f"{stem}_{run}.jsonl"
    return path


class ResultsWriter:
    """Appends rows of one benchmark run to one file, each with the run's common fields; the file is created at the
    first row (a run that measures nothing leaves nothing behind), by default as a fresh dated file in RESULTS."""

    def __init__(self, benchmark: str, device: str, path: Path | None = None, **fixed: object) -> None:
        self.common = {"benchmark": benchmark, "date": datetime.date.today().isoformat(), "device": device,
                       "versions": software_versions(), "commit": current_commit(),
                       "command": " ".join(["python", *sys.argv]), **fixed}
        self.path = path
        self._resolved: Path | None = None

    def write(self, **row: object) -> dict:
        """Append one row (the common fields, then ``row``) and return it as written."""
        if self._resolved is None:
            self._resolved = self.path or new_results_path(self.common["benchmark"], self.common["device"],
                                                           self.common["date"])
            self._resolved.parent.mkdir(parents=True, exist_ok=True)
        full = {**self.common, **row}
        with self._resolved.open("a") as sink:
            sink.write(json.dumps(full) + "\n")
        return full


def read_rows(path: Path) -> list[dict]:
    """The rows of one results file (blank lines skipped); a malformed line is an error naming file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error.msg})") from None
    return rows
