"""The stacked optimizers (vaeexp.optim): Keras's RMSprop rule, torch's Adam arithmetic, and
members that each update as they would alone, with their own hyperparameters."""

from __future__ import annotations

import pytest
import torch

from vaeexp.optim import Adam, KerasRMSprop, StackedOptimizer, make_optimizer, per_member

SHAPES = [(4, 5), (1, 5)]  # a weight and a bias, each behind the member dimension


def stack(members: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(members, *shape, generator=g) for shape in SHAPES]


def gradients(members: int, steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Each step's gradients, of very different sizes, so that eps and the rule both matter."""
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(members, *shape, generator=g) * 10.0 ** (step % 5 - 3) for shape in SHAPES]
        for step in range(steps)
    ]


def test_keras_rule_eps_inside_sqrt():
    p = torch.tensor([[[1.0, -2.0, 0.5]]])
    opt = KerasRMSprop([p], {"lr": 0.1, "rho": 0.9, "eps": 1e-7})
    grads = [torch.tensor([[[0.3, 1e-5, -2.0]]]), torch.tensor([[[0.1, 0.0, 1.0]]])]
    expected, v = p.clone(), torch.zeros(1, 1, 3)
    for g in grads:
        opt.step([g.clone()])
        v = 0.9 * v + 0.1 * g**2
        expected -= 0.1 * g / torch.sqrt(v + 1e-7)
        torch.testing.assert_close(p, expected)


def test_differs_from_torch_rmsprop_on_tiny_gradients():
    """Where v is ~0 (pixels that are always black) the two rules part company."""
    a = torch.zeros(1, 1, 1)
    b = torch.nn.Parameter(torch.zeros(1))
    keras = make_optimizer("rmsprop", [a], lr=1e-3)
    torch_rms = torch.optim.RMSprop([b], lr=1e-3, alpha=0.9, eps=1e-7)
    b.grad = torch.tensor([1e-6])
    keras.step([torch.full((1, 1, 1), 1e-6)])
    torch_rms.step()
    assert abs(a.item()) < 0.5 * abs(b.item())


@pytest.mark.parametrize("per_member_path", [False, True], ids=["fused", "per-member"])
def test_adam_is_torch_adam(per_member_path: bool):
    """Adam here is torch.optim.Adam (betas 0.9, 0.999, foreach) step for step, on the fused
    path (shared hyperparameters) and on the per-member one (tensors, as a captured step or a
    frozen member has them)."""
    params = stack(1)
    reference = [torch.nn.Parameter(p.clone()) for p in params]
    lr, eps = per_member([2e-3], torch.device("cpu"), per_member_path), 1e-7
    ours = make_optimizer("adam", params, lr=lr, eps=eps)
    assert isinstance(ours, Adam)
    assert isinstance(ours.hyper["lr"], torch.Tensor) is per_member_path
    theirs = torch.optim.Adam(reference, lr=2e-3, betas=(0.9, 0.999), eps=eps, foreach=True)
    for grads in gradients(1, 12):
        ours.step([g.clone() for g in grads])
        for p, g in zip(reference, grads, strict=True):
            p.grad = g.clone()
        theirs.step()
    moved = sum((p - q).abs().sum().item() for p, q in zip(params, stack(1), strict=True))
    assert moved > 1e-3  # the steps did something
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


MEMBER_HYPER = [  # lr, rho, eps: each member its own
    (1e-3, 0.9, 1e-7),
    (3e-2, 0.5, 1e-3),
    (5e-4, 0.99, 1e-5),
]


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_each_member_updates_as_a_one_member_optimizer_with_its_values(name: str):
    """A stack of three with different lr, rho and eps moves each member exactly as a
    one-member optimizer with that member's values moves it alone: nothing of one member's
    hyperparameters or statistics reaches another."""
    members = len(MEMBER_HYPER)
    params, steps = stack(members), gradients(members, 10)
    cpu = torch.device("cpu")
    lr, rho, eps = (per_member([h[i] for h in MEMBER_HYPER], cpu) for i in range(3))
    stacked = make_optimizer(name, params, lr, rho, eps)
    assert all(isinstance(h, torch.Tensor) for h in stacked.hyper.values())
    alone = []
    for m, (m_lr, m_rho, m_eps) in enumerate(MEMBER_HYPER):
        own = [p[m : m + 1].clone() for p in params]
        alone.append((own, make_optimizer(name, own, m_lr, m_rho, m_eps)))
    for grads in steps:
        stacked.step([g.clone() for g in grads])
        for m, (_, opt) in enumerate(alone):
            opt.step([g[m : m + 1].clone() for g in grads])
    # Not bit for bit: a per-member rho is a float32 tensor, so its 1 - rho is rounded from
    # float32(rho), ~1e-6 relative off the Python float's (0.99). A neighbour's lr or rho, or a
    # shared statistic, would move a member by orders of magnitude more.
    for m, (own, opt) in enumerate(alone):
        for p, q in zip(params, own, strict=True):
            torch.testing.assert_close(p[m : m + 1], q, rtol=1e-5, atol=1e-8)
        for key, tensors in opt.state.items():
            for t, mine in zip(stacked.state[key], tensors, strict=True):
                torch.testing.assert_close(t[m : m + 1], mine, rtol=1e-5, atol=1e-12)
    final = [p[:, 0, 0] for p in params]
    assert all(len(set(f.tolist())) == members for f in final)  # members did move apart


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_freeze_stops_that_member_only(name: str):
    """A frozen member (one that diverged) keeps its weights and forgets its statistics; the
    others continue exactly as they would have without the freeze."""
    members, frozen = 3, 1
    params, reference = stack(members), stack(members)
    steps = gradients(members, 8)
    opt = make_optimizer(name, params, lr=1e-2)
    unfrozen = make_optimizer(name, reference, lr=1e-2)
    for i, grads in enumerate(steps):
        if i == 4:
            opt.freeze(frozen)
            at_freeze = [p[frozen].clone() for p in params]
            assert all(t[frozen].count_nonzero() == 0 for ts in opt.state.values() for t in ts)
        opt.step([g.clone() for g in grads])
        unfrozen.step([g.clone() for g in grads])
    for p, at in zip(params, at_freeze, strict=True):
        assert torch.equal(p[frozen], at)
    for p, q in zip(params, reference, strict=True):
        assert not torch.equal(q[frozen], p[frozen])  # it would have moved
        for m in set(range(members)) - {frozen}:
            torch.testing.assert_close(p[m], q[m], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["rmsprop", "adam"])
def test_a_members_state_round_trips_into_another_optimizer(name: str):
    """A member's statistics (what its checkpoint holds) loaded into a one-member optimizer,
    or into another member's slot, continue exactly as the original goes on."""
    members, member = 3, 2
    params, steps = stack(members), gradients(members, 8)
    opt = make_optimizer(name, params, lr=1e-2)
    for grads in steps[:4]:
        opt.step([g.clone() for g in grads])
    state = opt.member_state(member)
    assert state["steps"] == 4
    alone = [p[member : member + 1].clone() for p in params]
    clone = make_optimizer(name, alone, lr=1e-2)
    clone.load_member_state(0, state)
    for grads in steps[4:]:
        opt.step([g.clone() for g in grads])
        clone.step([g[member : member + 1].clone() for g in grads])
    assert clone.steps == opt.steps == 8
    for p, q in zip(params, alone, strict=True):
        torch.testing.assert_close(p[member : member + 1], q, rtol=1e-6, atol=1e-8)


def test_make_optimizer_names():
    params = stack(1)
    assert isinstance(make_optimizer("rmsprop", params, lr=1e-3), KerasRMSprop)
    assert isinstance(make_optimizer("adam", params, lr=1e-3), Adam)
    assert issubclass(Adam, StackedOptimizer) and not isinstance(
        make_optimizer("adam", params, lr=1e-3), torch.optim.Optimizer
    )
    with pytest.raises(ValueError, match="optimizer=sgd is not allowed"):
        make_optimizer("sgd", params, lr=1e-3)
