"""The two exported models, for `mlflow.pyfunc.load_model(...).predict`: images ->
reconstructions, and latent codes -> images."""

from __future__ import annotations

import mlflow
import torch
from mlflow.models import infer_signature

from vaeexp.model import VAE


def log_models(model: VAE, example: torch.Tensor) -> None:
    """Log both models to the active run; `example` is a few images (n, 784)."""
    _log_model(model, example, "model")
    _log_model(_Decoder(model), torch.zeros(len(example), model.latent_dim), "decoder")


class _Decoder(torch.nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _log_model(module: torch.nn.Module, example: torch.Tensor, name: str) -> None:
    with torch.no_grad():
        output = module(example)
    mlflow.pytorch.log_model(
        module,
        name=name,
        input_example=example.numpy(),
        signature=infer_signature(example.numpy(), output.numpy()),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
    )
