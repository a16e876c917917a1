"""Data: a validating IDX reader, the Fashion-MNIST finder/loader and seeded batching.

No function here downloads anything.
"""

from bnlab.data.batches import BatchIterator, batches, epoch_order, to_float_images
from bnlab.data.fashion_mnist import (
    INSTALL_COMMAND,
    clear_cache,
    find_fashion_mnist,
    load_fashion_mnist,
)
from bnlab.data.idx import read_idx

__all__ = [
    "INSTALL_COMMAND",
    "BatchIterator",
    "batches",
    "clear_cache",
    "epoch_order",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "to_float_images",
]
