"""Datasets in memory, through torchvision's dataset classes and the bundled offline digits."""

from vaeexp.data.datasets import (
    BundledMNIST,
    DataBroken,
    Dataset,
    DataUnavailable,
    fallback_config,
    load_data,
)

__all__ = [
    "BundledMNIST",
    "DataBroken",
    "DataUnavailable",
    "Dataset",
    "fallback_config",
    "load_data",
]
