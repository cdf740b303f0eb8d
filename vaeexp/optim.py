"""Optimizers, including RMSprop with Keras's update rule.

Keras adds eps inside the square root (p -= lr * g / sqrt(v + eps)); torch.optim.RMSprop adds it
outside (sqrt(v) + eps), and no torch optimizer has Keras's rule, so it is written here. Keras's
rule is not scale-invariant: where v = E[g^2] is of the order of eps (pixels that are almost
always 0, or the reference's per-pixel objective, whose gradients are 1/784 of those of nats per
image) eps damps the step, and where v is large it does nothing. So the scale of the loss changes
how the reference trains, which is why vaeexp.step.objective_weight keeps the reference's scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class KerasRMSprop(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7):
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            squares = []
            for p in params:
                state = self.state[p]
                if "square_avg" not in state:
                    state["square_avg"] = torch.zeros_like(p)
                squares.append(state["square_avg"])
            # v = rho * v + (1 - rho) * g^2 ; p -= lr * g / sqrt(v + eps), fused over all params
            torch._foreach_mul_(squares, group["rho"])
            torch._foreach_addcmul_(squares, grads, grads, value=1 - group["rho"])
            denom = torch._foreach_add(squares, group["eps"])
            torch._foreach_sqrt_(denom)
            torch._foreach_addcdiv_(params, grads, denom, value=-group["lr"])
        return loss


def make_optimizer(
    name: str, params: Iterable, lr: float, rho: float = 0.9, eps: float = 1e-7
) -> torch.optim.Optimizer:
    if name == "rmsprop":
        return KerasRMSprop(params, lr=lr, rho=rho, eps=eps)
    if name == "adam":  # Keras's Adam defaults, eps outside the root as in both libraries
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=eps, foreach=True)
    raise ValueError(f"optimizer={name} is not allowed: must be one of rmsprop, adam")
