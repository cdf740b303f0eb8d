import numpy as np
import torch

from vaeexp import images
from vaeexp.model import VAE


def test_tile_layout():
    grid = images.tile(np.ones((5, 784)), ncols=3, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 30 + 2, 3 * 30 + 2)
    assert grid[2:30, 2:30].min() == 255  # first cell filled
    assert grid[32:60, 62:90].max() == 255  # padding colour fills the empty sixth cell


def test_grids_from_model():
    model = VAE(latent_dim=2, intermediate_dim=8)
    assert images.reconstructions(model, torch.rand(20, 784)).shape == (4 * 30 + 2, 302)
    assert images.samples(model, torch.randn(100, 2)).shape == (302, 302)
    assert images.manifold(model).shape == (560, 560)
