"""vaeexp: watch a variational autoencoder learn, and compare what its settings change."""

__version__ = "0.1.0"
