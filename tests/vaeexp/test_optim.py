import torch

from vaeexp.optim import KerasRMSprop, make_optimizer


def test_keras_rule_eps_inside_sqrt():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = KerasRMSprop([p], lr=0.1, rho=0.9, eps=1e-7)
    grads = [torch.tensor([0.3, 1e-5, -2.0]), torch.tensor([0.1, 0.0, 1.0])]
    expected, v = p.detach().clone(), torch.zeros(3)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        v = 0.9 * v + 0.1 * g**2
        expected -= 0.1 * g / torch.sqrt(v + 1e-7)
        torch.testing.assert_close(p.detach(), expected)


def test_differs_from_torch_rmsprop_on_tiny_gradients():
    """Where v is ~0 (pixels that are always black) the two rules part company."""
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    keras, torch_rms = (
        KerasRMSprop([a], lr=1e-3),
        torch.optim.RMSprop([b], lr=1e-3, alpha=0.9, eps=1e-7),
    )
    a.grad = b.grad = torch.tensor([1e-6])
    keras.step()
    torch_rms.step()
    assert abs(a.item()) < 0.5 * abs(b.item())


def test_state_round_trip():
    p = torch.nn.Parameter(torch.ones(2))
    opt = make_optimizer("rmsprop", [p], lr=1e-3)
    p.grad = torch.ones(2)
    opt.step()
    clone = make_optimizer("rmsprop", [torch.nn.Parameter(torch.ones(2))], lr=1e-3)
    clone.load_state_dict(opt.state_dict())
    assert torch.equal(
        clone.state_dict()["state"][0]["square_avg"], opt.state_dict()["state"][0]["square_avg"]
    )
    assert isinstance(make_optimizer("adam", [p], lr=1e-3), torch.optim.Adam)
