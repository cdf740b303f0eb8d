"""Digit grids as uint8 arrays (torchvision's `make_grid`): reconstructions, samples, latent
manifold."""

from __future__ import annotations

import numpy as np
import torch

from vaeexp.model import VAE

SIDE = 28


def tile(images: torch.Tensor, ncols: int, pad: int = 2) -> np.ndarray:
    """Lay out (n, 784) images in [0, 1] as one grey uint8 image, row by row, on white.
    torchvision is imported here, where a grid is drawn, not when the module is."""
    from torchvision.utils import make_grid

    cells = images.detach().float().cpu().reshape(-1, 1, SIDE, SIDE)
    grid = make_grid(cells, nrow=ncols, padding=pad, pad_value=1.0)[0]
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor, ncols: int = 10) -> np.ndarray:
    """Rows alternate: originals, then their reconstructions (decoded posterior means)."""
    recon = model(x)
    rows = []
    for start in range(0, len(x), ncols):
        rows += [x[start : start + ncols], recon[start : start + ncols]]
    return tile(torch.cat(rows), ncols)


@torch.no_grad()
def samples(model: VAE, z: torch.Tensor, ncols: int = 10) -> np.ndarray:
    """Decoded draws from the prior; pass the same z every epoch so the grids are comparable."""
    return tile(model.decode(z), ncols)


@torch.no_grad()
def manifold(model: VAE, n: int = 20, device: torch.device | str = "cpu") -> np.ndarray:
    """The decoded n x n grid over a 2-d latent plane, at the prior's 5%..95% quantiles as in the
    Keras example; z1 grows to the right, z2 grows upwards."""
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    z1, z2 = torch.meshgrid(q, q.flip(0), indexing="xy")
    z = torch.stack((z1.reshape(-1), z2.reshape(-1)), dim=1).to(device)
    return tile(model.decode(z), n, pad=0)
