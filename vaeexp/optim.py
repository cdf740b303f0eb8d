"""Optimizers over stacked parameters, each member with its own hyperparameters: RMSprop with
Keras's update rule, and Adam.

Keras adds eps inside the square root (p -= lr * g / sqrt(v + eps)); torch.optim.RMSprop adds it
outside (sqrt(v) + eps), and no torch optimizer has Keras's rule, so it is written here. Keras's
rule is not scale-invariant: where v = E[g^2] is of the order of eps (pixels that are almost
always 0, or the reference's per-pixel objective, whose gradients are 1/784 of those of nats per
image) eps damps the step, and where v is large it does nothing. So the scale of the loss changes
how the reference trains, which is why vaeexp.step.objective_weight keeps the reference's scale.

Written by hand rather than as torch.optim optimizers because each member of a stack (the
leading dimension of every parameter) has its own lr, rho and eps: torch's optimizers take one
value per parameter group. A hyperparameter all members share stays a Python number, and its
part of the update is torch's fused `_foreach` arithmetic over all parameters (a single run's
step costs what it did with one torch optimizer, and a large stack's memory-bound update makes
fewer passes); one that differs is a (M, 1, 1) tensor broadcast over each parameter. Adam
follows torch.optim.Adam's arithmetic (eps outside the root, bias corrections in the step size),
with Keras's defaults (betas 0.9, 0.999).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

OPTIMIZERS = ("rmsprop", "adam")
ADAM_BETAS = (0.9, 0.999)

Hyper = float | torch.Tensor  # one value for every member, or one each, shaped (M, 1, 1)


def per_member(
    values: Sequence[float],
    device: torch.device,
    as_tensor: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Hyper:
    """One number when every member has the same (and `as_tensor` is off), else (M, 1, 1)."""
    if not as_tensor and all(v == values[0] for v in values):
        return float(values[0])
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1, 1)


def _single(h: Hyper) -> Hyper:
    """A per-member tensor in the parameters' precision (float32)."""
    return h.float() if isinstance(h, torch.Tensor) else h


class StackedOptimizer:
    """`step(grads)` updates `params` (each (M, ...)) in place; `state` holds the running
    statistics, a list per name, one tensor per parameter."""

    STATE: tuple[str, ...] = ()

    def __init__(self, params: list[torch.Tensor], hyper: dict[str, Hyper]) -> None:
        """`hyper`'s tensors may be float64, so that what is derived from them (1 - rho) rounds
        as the same number does on the fused path; they are used in float32."""
        self.params = params
        self.derived = {f"1-{k}": _single(1 - v) for k, v in hyper.items() if k == "rho"}
        self.hyper = {k: _single(v) for k, v in hyper.items()}
        self.state = {name: [torch.zeros_like(p) for p in params] for name in self.STATE}
        self.steps = 0
        self.version = 0  # changes when a hyperparameter stops being one shared number

    def step(self, grads: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    def freeze(self, member: int) -> None:
        """Member `member` learns no more (a diverged member): its lr is 0 from now on."""
        lr = self.hyper["lr"]
        if not isinstance(lr, torch.Tensor):  # a captured step (vaeexp.trainer) captures again
            lr = torch.full((len(self.params[0]), 1, 1), lr, device=self.params[0].device)
            self.hyper["lr"] = lr
            self.version += 1
        lr[member] = 0.0
        for tensors in self.state.values():
            for t in tensors:
                t[member].zero_()

    def member_state(self, member: int) -> dict[str, object]:
        """One member's statistics, as a one-member optimizer holds them (a checkpoint's)."""
        state: dict[str, object] = {
            name: [t[member : member + 1].clone() for t in tensors]
            for name, tensors in self.state.items()
        }
        state["steps"] = self.steps
        return state

    def load_member_state(self, member: int, state: dict[str, object]) -> None:
        for name, tensors in self.state.items():
            for t, saved in zip(tensors, state[name], strict=True):  # type: ignore[call-overload]
                t[member : member + 1].copy_(saved)
        self.steps = int(state["steps"])  # type: ignore[call-overload]


class KerasRMSprop(StackedOptimizer):
    """v = rho * v + (1 - rho) * g^2 ; p -= lr * g / sqrt(v + eps)."""

    STATE = ("square_avg",)

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.steps += 1
        params, squares = self.params, self.state["square_avg"]
        lr, rho, eps = self.hyper["lr"], self.hyper["rho"], self.hyper["eps"]
        _mul_(squares, rho)
        _addcmul_(squares, grads, grads, self.derived["1-rho"])
        denom = _add(squares, eps)
        torch._foreach_sqrt_(denom)
        _step_(params, grads, denom, lr)


class Adam(StackedOptimizer):
    """torch.optim.Adam's update: m, v moving averages of g and g^2; p -= lr / (1 - b1^t) *
    m / (sqrt(v / (1 - b2^t)) + eps)."""

    STATE = ("exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        params, means, squares = self.params, self.state["exp_avg"], self.state["exp_avg_sq"]
        lr, eps = self.hyper["lr"], self.hyper["eps"]
        torch._foreach_lerp_(means, grads, 1 - beta1)
        torch._foreach_mul_(squares, beta2)
        torch._foreach_addcmul_(squares, grads, grads, value=1 - beta2)
        correction1 = 1 - beta1**self.steps
        root_correction2 = math.sqrt(1 - beta2**self.steps)
        denom = torch._foreach_sqrt(squares)
        torch._foreach_div_(denom, root_correction2)
        denom = _add(denom, eps)
        _step_(params, means, denom, lr / correction1)


# The update's arithmetic, for a hyperparameter that is one number (torch's fused `_foreach`
# kernels) or one per member (broadcast over each parameter), rounded alike either way.


def _mul_(xs: list[torch.Tensor], h: Hyper) -> None:
    if isinstance(h, torch.Tensor):
        for x in xs:
            x.mul_(h)
    else:
        torch._foreach_mul_(xs, h)


def _addcmul_(
    xs: list[torch.Tensor], a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], h: Hyper
) -> None:
    """x += h * a * b"""
    if isinstance(h, torch.Tensor):
        for x, ai, bi in zip(xs, a, b, strict=True):
            x.addcmul_(ai * h, bi)
    else:
        torch._foreach_addcmul_(xs, a, b, value=h)


def _add(xs: list[torch.Tensor], h: Hyper) -> list[torch.Tensor]:
    if isinstance(h, torch.Tensor):
        return [x + h for x in xs]
    return list(torch._foreach_add(xs, h))


def _step_(
    params: list[torch.Tensor], num: Sequence[torch.Tensor], denom: list[torch.Tensor], lr: Hyper
) -> None:
    """p += (-lr * num) / denom, in the order torch's fused kernel rounds it."""
    if isinstance(lr, torch.Tensor):
        for p, n, d in zip(params, num, denom, strict=True):
            p.addcdiv_(n * -lr, d)
    else:
        torch._foreach_addcdiv_(params, num, denom, value=-lr)


def make_optimizer(
    name: str,
    params: list[torch.Tensor],
    lr: Hyper,
    rho: Hyper = 0.9,
    eps: Hyper = 1e-7,
) -> StackedOptimizer:
    if name == "rmsprop":
        return KerasRMSprop(params, {"lr": lr, "rho": rho, "eps": eps})
    if name == "adam":  # Keras's Adam defaults, eps outside the root as in both libraries
        return Adam(params, {"lr": lr, "eps": eps})
    raise ValueError(f"optimizer={name} is not allowed: must be one of {', '.join(OPTIMIZERS)}")
