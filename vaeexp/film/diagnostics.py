"""What a frame says in numbers: how well the latent means separate the classes, how many latent
dimensions are in use."""

from __future__ import annotations

import numpy as np

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): a unit is active if Cov_x(E_q[z_u]) > 0.01
QUERIES = 1000


def split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (queries, references) indices for the kNN accuracy: the same points every frame."""
    order = np.random.default_rng(seed).permutation(len(labels))
    n = min(QUERIES, len(labels) // 5)
    return np.sort(order[:n]), np.sort(order[n:])


def knn_accuracy(
    means: np.ndarray, labels: np.ndarray, queries: np.ndarray, refs: np.ndarray, k: int
) -> float:
    """Share of query points whose k nearest reference points (Euclidean, in the latent space)
    vote for their own label; ties go to the nearest of the tied labels."""
    k = min(k, len(refs))
    if means.shape[1] <= 8:  # a k-d tree is fastest in few dimensions
        from scipy.spatial import cKDTree

        x = means.astype(np.float64)
        _, nearest = cKDTree(x[refs]).query(x[queries], k=k)
        nearest = np.asarray(nearest).reshape(len(queries), k)
    else:  # and brute force in many
        import torch

        x = torch.from_numpy(np.ascontiguousarray(means, np.float32))
        r = x[refs]
        r2 = r.square().sum(dim=1)[None]
        nearest = torch.cat(  # |r|^2 - 2 q.r ranks as the distance does; in cache-sized blocks
            [
                torch.addmm(r2, q, r.T, alpha=-2).topk(k, dim=1, largest=False).indices
                for q in x[queries].split(100)
            ]
        ).numpy()
    votes = labels[refs][nearest]
    n_classes = int(labels.max()) + 1
    counts = np.zeros((len(queries), n_classes))
    rank_weight = 1.0 - np.arange(k) / (2.0 * k)  # < 1: breaks ties only, towards the nearest
    np.add.at(counts, (np.arange(len(queries))[:, None], votes), rank_weight)
    return float((counts.argmax(axis=1) == labels[queries]).mean())


def active_units(means: np.ndarray) -> int:
    """Latent dimensions whose means vary over the images: the ones the decoder can use."""
    return int((means.astype(np.float64).var(axis=0) > ACTIVE_THRESHOLD).sum())
