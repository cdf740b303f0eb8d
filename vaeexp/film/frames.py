"""The film's frames: latent means of the filmed test images at each frame's step, on disk, and
what a frame says in numbers (how well the means separate the classes, how many latent
dimensions are in use) and in its title.

Frames are appended to a file as they are captured, so memory stays flat however many there are,
and packed at the end into one compressed `frames.npz` that anyone can re-render from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

F16_MAX = 65000.0  # means are kept as float16: ample precision to draw, half the size
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): a unit is active if Cov_x(E_q[z_u]) > 0.01
QUERIES = 1000


class FrameStore:
    """The frames captured so far, appended to `means.f16` as they come: memory stays flat."""

    def __init__(self, folder: Path, n_points: int, latent_dim: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "means.f16"
        self.shape = (n_points, latent_dim)
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.steps: list[int] = []
        self.epochs: list[int] = []
        self.losses: list[tuple[float, float]] = []

    def append(self, step: int, epoch: int, losses: tuple[float, float], means: np.ndarray) -> None:
        self._f.write(np.clip(means, -F16_MAX, F16_MAX).astype(np.float16).tobytes())
        self.steps.append(step)
        self.epochs.append(epoch)
        self.losses.append(losses)

    def means(self) -> np.ndarray:
        """All frames so far, (frames, points, latent_dim), read from disk as needed."""
        self._f.flush()
        if not self.steps:
            return np.zeros((0, *self.shape), np.float16)
        return np.memmap(self.path, np.float16, "r", shape=(len(self.steps), *self.shape))

    def close(self) -> None:
        self._f.close()

    def save(self, path: Path, labels: np.ndarray, index: np.ndarray, meta: dict) -> Path:
        """Everything needed to re-render the film, packed into one compressed file."""
        np.savez_compressed(
            path,
            steps=np.array(self.steps, np.int64),
            epochs=np.array(self.epochs, np.int64),
            losses=np.array(self.losses, np.float32).reshape(-1, 2),
            means=self.means(),
            labels=labels,
            test_index=index,
            meta=np.array(json.dumps(meta)),
        )
        return path


@dataclass
class Frames:
    """A film's frames read back from `frames.npz`."""

    steps: np.ndarray
    epochs: np.ndarray
    losses: np.ndarray  # (frames, 2): recon, KL of the frame step's batch; NaN at step 0
    means: np.ndarray  # (frames, points, latent_dim)
    labels: np.ndarray
    meta: dict  # class_names, epochs (of the run), data

    @classmethod
    def load(cls, path: Path) -> Frames:
        with np.load(path) as z:
            return cls(
                z["steps"],
                z["epochs"],
                z["losses"],
                z["means"],
                z["labels"],
                json.loads(str(z["meta"])),
            )

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[tuple[int, int, tuple[float, float], np.ndarray]]:
        for i in range(len(self)):
            yield (
                int(self.steps[i]),
                int(self.epochs[i]),
                (float(self.losses[i, 0]), float(self.losses[i, 1])),
                self.means[i],
            )


def title(step: int, epoch: int, epochs: int, losses: Sequence[float]) -> str:
    """A frame's title: where in training it was taken, and the loss of that step's batch."""
    if step == 0:
        return f"step 0, before training  ({epochs} epochs)"
    recon, kl = losses
    return (
        f"epoch {epoch}/{epochs}  step {step}  batch loss {recon + kl:.1f} "
        f"(recon {recon:.1f}, KL {kl:.1f})"
    )


def knn_split(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
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
    if means.shape[1] <= 8:  # a k-d tree prunes well in few dimensions
        from scipy.spatial import cKDTree

        x = means.astype(np.float64)
        _, nearest = cKDTree(x[refs]).query(x[queries], k=k)
        nearest = np.asarray(nearest).reshape(len(queries), k)
    else:  # in many it visits most points anyway: brute force, as matrix products
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
