"""Datasets for efla's experiments, loaded from local files only (no downloads)."""

from efla.data.mnist import MnistSplit, load_mnist, load_mnist_5k, load_mnist_idx, read_idx

__all__ = ["MnistSplit", "load_mnist", "load_mnist_5k", "load_mnist_idx", "read_idx"]
