"""The film's side of the training thread: which test images are filmed, and their encoder pass.

The encoder pass is the one cost a frame cannot avoid, and done in the training thread it has
all the cores to itself; everything after it is the worker's (vaeexp.film.recorder.FilmWorker).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from vaeexp import images
from vaeexp.config import FilmPrecision
from vaeexp.model import VAE

# Test images per encoder call: products large enough to keep every core busy, and a call's
# activations small enough to stay in cache.
CHUNK = 2000


def film_points(labels: torch.Tensor, points: int | None) -> np.ndarray:
    """Indices of the filmed test images, in drawing order: all of them, or a stratified sample
    with each class in its share. Fixed (not the run's seed), so runs film the same images."""
    y = labels.numpy()
    rng = np.random.default_rng(0)
    if points is None or points >= len(y):
        return rng.permutation(len(y))
    classes, counts = np.unique(y, return_counts=True)
    share = counts * points / len(y)
    take = np.floor(share).astype(int)
    take[np.argsort(take - share)[: points - take.sum()]] += 1  # largest remainders
    picked = [
        rng.choice(np.flatnonzero(y == c), k, replace=False)
        for c, k in zip(classes, take, strict=True)
    ]
    return rng.permutation(np.concatenate(picked))


def use_bf16(precision: FilmPrecision, device: torch.device) -> bool:
    """auto: bf16 only on a CPU with native bf16, where it makes the encoder pass cheaper."""
    if precision != FilmPrecision.auto:
        return precision == FilmPrecision.bf16
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def to_host(tensor: torch.Tensor) -> Callable[[], np.ndarray]:
    """The tensor's values for the film's worker, without making training wait: on a GPU the
    copy is queued behind the work that computes it, into pinned memory, and the worker's call
    waits for it; elsewhere the tensor is already in host memory."""
    if tensor.device.type != "cuda":
        array = tensor.detach().cpu().numpy()
        return lambda: array
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor.detach(), non_blocking=True)
    copied = torch.cuda.Event(blocking=True)  # the worker sleeps while it waits, never spins
    copied.record(torch.cuda.current_stream(tensor.device))

    def wait() -> np.ndarray:
        copied.synchronize()
        return host.numpy()

    return wait


class FilmedImages:
    """The filmed test images on the model's device, in test-set order (`filmed`: their sorted
    indices), ready for a frame's encoder pass."""

    def __init__(
        self,
        test_x: torch.Tensor,
        filmed: np.ndarray,
        precision: FilmPrecision,
        device: torch.device,
    ) -> None:
        # All test images: the dataset's own tensor, not a copy of the whole test set; means are
        # put in drawing order after encoding, in the worker.
        everything = len(filmed) == len(test_x)
        x = test_x if everything else test_x[filmed]
        self.bf16 = use_bf16(precision, device)
        # bf16 makes the frame's encoder pass, the film's one cost inside the training loop,
        # cheaper where the CPU computes it natively; the means move by a fraction of a pixel in
        # the frame.
        self.x = (x.bfloat16() if self.bf16 else x).to(device)

    def means(self, model: VAE) -> torch.Tensor:
        """Latent means of the filmed images, on the model's device, (M, points, latent_dim):
        every member of a stack in one encoder pass. Eval mode, no grad and no random numbers,
        so the run's metrics are the same with the film on or off; the model's mode is
        restored."""
        was_training = model.training
        model.eval()
        with torch.inference_mode(), torch.autocast(self.x.device.type, enabled=self.bf16):
            chunks = [model.encode(xb)[0] for xb in self.x.split(CHUNK)]
        model.train(was_training)
        means = torch.cat(chunks, dim=-2).float()
        return means.view(model.members, *means.shape[-2:])

    def decoded_grids(self, model: VAE) -> list[np.ndarray]:
        """The decoder film's frame of each member: the decoded 20x20 grid, cheap enough (400
        decodes a member) to take in the training thread."""
        return [
            images.manifold(model.member(m), device=self.x.device) for m in range(model.members)
        ]
