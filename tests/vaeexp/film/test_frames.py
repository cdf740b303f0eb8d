"""The film's frames (vaeexp.film.frames): their diagnostics, the k-NN accuracy of the latent
means and the active units."""

from __future__ import annotations

import numpy as np

from vaeexp.film.frames import active_units, knn_accuracy, knn_split


def test_knn_accuracy_and_active_units():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    centres = rng.normal(size=(10, 8)) * 100
    separated = centres[labels] + rng.normal(size=(1000, 8))
    queries, refs = knn_split(labels)
    assert knn_accuracy(separated, labels, queries, refs, k=5) == 1.0
    noise = rng.normal(size=(1000, 8))
    assert knn_accuracy(noise, labels, queries, refs, k=5) < 0.3
    wide = np.concatenate([separated, noise], axis=1)  # 16 dims: the brute-force path
    assert knn_accuracy(wide, labels, queries, refs, k=5) == 1.0
    collapsed = np.concatenate([noise[:, :3], np.full((1000, 5), 0.3)], axis=1)
    assert active_units(collapsed) == 3
