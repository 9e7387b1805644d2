"""Data: offline Fashion-MNIST (tfds), random-access sources, VTAB-1k splits, grain pipeline."""

from hydra_jax.data.fashion_mnist import FashionMnistOffline, prepare_fashion_mnist
from hydra_jax.data.pipeline import epoch_order, eval_batches, eval_size, train_batches
from hydra_jax.data.sources import FolderSource, TfdsSource, get_source
from hydra_jax.data.vtab import FASHION_MNIST_1K, TASKS, VTAB1K, source_options

__all__ = [
    "FASHION_MNIST_1K", "TASKS", "VTAB1K", "FashionMnistOffline", "FolderSource",
    "TfdsSource",
    "epoch_order", "eval_batches", "eval_size", "get_source", "prepare_fashion_mnist",
    "source_options", "train_batches",
]
