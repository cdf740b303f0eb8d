"""What the film captures (vaeexp.film.capture): which test images it follows, and their means
for every member of a stack in one pass."""

from __future__ import annotations

import numpy as np
import torch

from vaeexp.config import FilmPrecision
from vaeexp.film.capture import FilmedImages, film_points
from vaeexp.model import IMAGE_DIM, VAE


def test_points_are_stratified_and_fixed():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    idx = film_points(labels, 100)
    assert len(set(idx.tolist())) == 100
    assert np.bincount(labels.numpy()[idx]).tolist() == [50, 30, 20]
    assert (film_points(labels, 100) == idx).all()  # not the run's seed
    assert sorted(film_points(labels, None).tolist()) == list(range(1000))


def test_a_stacks_means_are_each_members_own():
    """One encoder pass films every member: row m is member m's posterior means of the filmed
    images, in test-set order, as that member alone encodes them; training mode is kept."""
    generators = [torch.Generator().manual_seed(s) for s in (0, 1, 2)]
    model = VAE(latent_dim=2, intermediate_dim=16, members=3, generators=generators).train()
    test_x = torch.rand(50, IMAGE_DIM)
    filmed = np.sort(film_points(torch.arange(50) % 5, 20))
    means = FilmedImages(test_x, filmed, FilmPrecision.fp32, torch.device("cpu")).means(model)
    assert means.shape == (3, 20, 2) and model.training
    for m in range(3):
        with torch.no_grad():
            alone = model.member(m).encode(test_x[filmed])[0]
        torch.testing.assert_close(means[m], alone)
    assert not torch.allclose(means[0], means[1])
