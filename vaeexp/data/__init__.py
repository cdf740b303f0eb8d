"""Datasets in memory, through torchvision's dataset classes and the bundled offline digits."""

from vaeexp.data.datasets import BundledMNIST, Dataset, DataUnavailable, fallback_config, load_data

__all__ = ["BundledMNIST", "DataUnavailable", "Dataset", "fallback_config", "load_data"]
