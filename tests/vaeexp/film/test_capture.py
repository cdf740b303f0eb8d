"""What the film captures (vaeexp.film.capture): which test images it follows."""

from __future__ import annotations

import numpy as np
import torch

from vaeexp.film.capture import film_points


def test_points_are_stratified_and_fixed():
    labels = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
    idx = film_points(labels, 100)
    assert len(set(idx.tolist())) == 100
    assert np.bincount(labels.numpy()[idx]).tolist() == [50, 30, 20]
    assert (film_points(labels, 100) == idx).all()  # not the run's seed
    assert sorted(film_points(labels, None).tolist()) == list(range(1000))
