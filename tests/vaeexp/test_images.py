import numpy as np
import torch

from vaeexp import images
from vaeexp.model import VAE


def test_tile_layout():
    grid = images.tile(torch.ones(5, 784) * 0.5, ncols=3, pad=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 30 + 2, 3 * 30 + 2)
    assert (grid[2:30, 2:30] == 128).all()  # first cell: the image
    assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all()  # white padding
    assert (grid[32:60, 62:90] == 255).all()  # the empty sixth cell is padding colour


def test_tile_keeps_row_order():
    cells = torch.arange(4).float().repeat_interleave(784).reshape(4, 784) / 3
    grid = images.tile(cells, ncols=2, pad=0)
    assert [grid[0, 0], grid[0, 28], grid[28, 0], grid[28, 28]] == [0, 85, 170, 255]


def test_grids_from_model():
    model = VAE(latent_dim=2, intermediate_dim=8)
    assert images.reconstructions(model, torch.rand(20, 784)).shape == (4 * 30 + 2, 302)
    assert images.samples(model, torch.randn(100, 2)).shape == (302, 302)
    assert images.manifold(model).shape == (560, 560)
