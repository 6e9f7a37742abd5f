"""The training step's optimizer update: a gradient that is not finite is refused, a finite one is clipped and
applied exactly as torch's own clip-then-step does."""

import copy
import math

import pytest
import torch

from jointray.train.update import guarded_update


def _twin(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An independent copy of ``net`` with its gradients, and of ``optimizer`` with its state."""
    twin = copy.deepcopy(net)  # a deep copy leaves the gradients behind
    for p, q in zip(net.parameters(), twin.parameters()):
        q.grad = p.grad.clone()
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # AdamW's step counts, not shared
    return twin, twin_optimizer


def _net_with_gradients(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.InstanceNorm3d(4), torch.nn.PReLU(),
                              torch.nn.Conv3d(4, 3, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    image, label = torch.randn(2, 1, 6, 8, 6), torch.randint(0, 3, (2, 6, 8, 6))
    for _ in range(2):  # two real steps first, so that AdamW has moments to protect
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(image), label).backward()
        optimizer.step()
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(net(image), label).backward()
    return net, optimizer


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 3e38])  # 3e38: finite, but its square overflows
def test_a_gradient_that_is_not_finite_leaves_weights_and_optimizer_state_untouched(bad):
    net, optimizer = _net_with_gradients()
    net[0].weight.grad[0, 0, 1, 1, 1] = bad
    weights, state = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())

    # What the loop did before the guard: clipping turns an inf or NaN entry into NaN, and the step puts it in
    # the weights (a finite 3e38 makes the norm inf, and clipping zeroes the whole gradient instead).
    unguarded, unguarded_optimizer = _twin(net, optimizer)
    torch.nn.utils.clip_grad_norm_(unguarded.parameters(), 1.0)
    unguarded_optimizer.step()
    assert torch.isfinite(unguarded[0].weight).all() == math.isfinite(bad)

    assert guarded_update(optimizer, net.parameters(), grad_clip=1.0) is False
    for name, value in net.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    after = optimizer.state_dict()["state"]
    for index, moments in state["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(after[index][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_a_finite_gradient_is_clipped_and_applied_as_torch_does(grad_clip):
    net, optimizer = _net_with_gradients()
    reference, reference_optimizer = _twin(net, optimizer)
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip or float("inf"))
    assert grad_clip is None or norm > grad_clip  # the clip does something in this case
    reference_optimizer.step()

    assert guarded_update(optimizer, net.parameters(), grad_clip) is True
    for p, q in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
