"""Schedules (EMA tau, LR warmup + cosine), parameter groups and the LARS optimiser."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.optim import LARS, build_optimizer, parameter_groups, tau_schedule, warmup_cosine


# -- tau ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau_base,total", [(0.996, 1000), (0.99, 37), (0.98, 1)])
def test_tau_schedule_end_points_and_monotonic(tau_base, total):
    tau = tau_schedule(tau_base, total)
    assert len(tau) == total + 1
    assert tau[0] == pytest.approx(tau_base, abs=1e-12)
    assert tau[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.diff(tau) >= -1e-15)
    assert np.all((tau >= tau_base - 1e-12) & (tau <= 1 + 1e-12))


def test_tau_schedule_formula_midpoint():
    tau = tau_schedule(0.99, 100)
    # tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2: halfway at k = K / 2
    assert tau[50] == pytest.approx(0.995, abs=1e-12)
    k = 17
    assert tau[k] == pytest.approx(1 - 0.01 * (math.cos(math.pi * k / 100) + 1) / 2, abs=1e-12)


# -- learning rate -----------------------------------------------------------------------------
def test_warmup_cosine_shape():
    base, total, warmup, final = 2.0, 200, 20, 0.1
    lr = warmup_cosine(base, total, warmup, final)
    assert len(lr) == total
    assert 0 < lr[0] <= base / warmup + 1e-12  # starts near zero
    assert lr[warmup - 1] == pytest.approx(base)  # peak reached at the end of warmup
    assert lr.max() == pytest.approx(base)
    assert np.all(np.diff(lr[:warmup]) > 0)  # linear ramp up
    assert np.allclose(np.diff(lr[:warmup]), base / warmup)
    assert np.all(np.diff(lr[warmup:]) <= 1e-12)  # cosine decay, never rising again
    assert lr[-1] == pytest.approx(final, abs=1e-3 * (base - final))  # ends at `final`
    assert np.all(lr >= final - 1e-12)
    # halfway through the decay the cosine is at the midpoint
    mid = warmup + (total - warmup) // 2
    assert lr[mid] == pytest.approx((base + final) / 2, abs=1e-9)


def test_warmup_cosine_without_warmup_and_with_too_long_warmup():
    lr = warmup_cosine(1.0, 50, 0)
    assert len(lr) == 50 and lr[0] == pytest.approx(1.0) and lr[-1] < 0.01
    lr = warmup_cosine(1.0, 10, 100)  # warmup longer than the run: clipped, no crash
    assert len(lr) == 10 and lr[-1] == pytest.approx(1.0) and lr[0] == pytest.approx(0.1)


# -- parameter groups --------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.ln = nn.LayerNorm(5)
        self.frozen = nn.Linear(5, 2)
        for p in self.frozen.parameters():
            p.requires_grad_(False)


def test_parameter_groups_excludes_exactly_the_1d_params():
    net, head = Net(), nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    groups = parameter_groups([net, head], weight_decay=1e-4)
    assert len(groups) == 2
    regular, excluded = groups
    assert regular["lars_exclude"] is False and regular["weight_decay"] == 1e-4
    assert excluded["lars_exclude"] is True and excluded["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}
    expected_excluded = {net.bn.weight, net.bn.bias, net.fc.bias, net.ln.weight, net.ln.bias,
                         head[0].bias, head[1].weight, head[1].bias}
    expected_regular = {net.conv.weight, net.fc.weight, head[0].weight}
    assert ids(excluded["params"]) == ids(expected_excluded)
    assert ids(regular["params"]) == ids(expected_regular)
    assert len(excluded["params"]) == len(expected_excluded)  # no duplicates
    frozen = ids(net.frozen.parameters())
    assert frozen.isdisjoint(ids(regular["params"]) | ids(excluded["params"]))


def test_parameter_groups_on_a_resnet():
    from trainer.models import build_encoder
    enc, _ = build_encoder("resnet18", "small")
    regular, excluded = parameter_groups([enc], 1e-5)
    assert all(p.ndim == 1 for p in excluded["params"]) and all(p.ndim > 1 for p in regular["params"])
    assert len(regular["params"]) + len(excluded["params"]) == len(list(enc.parameters()))


# -- LARS --------------------------------------------------------------------------------------
def _grads(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def test_lars_excluded_group_is_plain_momentum_sgd():
    torch.manual_seed(0)
    a = [nn.Parameter(torch.randn(7, dtype=torch.float64)), nn.Parameter(torch.randn(3, dtype=torch.float64))]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    lars = LARS([{"params": a, "weight_decay": 0.0, "lars_exclude": True}], lr=0.3, momentum=0.9,
                weight_decay=0.5, trust_coefficient=1e-3)  # the default wd must not leak into the group
    sgd = torch.optim.SGD(b, lr=0.3, momentum=0.9, weight_decay=0.0)
    for step in range(4):
        for pa, pb, g in zip(a, b, _grads([p.shape for p in a], step)):
            pa.grad, pb.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
        for pa, pb in zip(a, b):
            torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-12, atol=1e-12)


def test_lars_excluded_group_ignores_trust_and_weight_decay_even_if_set():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = LARS([{"params": [p], "lars_exclude": True, "weight_decay": 0.1}], lr=0.5, momentum=0.9,
               trust_coefficient=1e-3)
    g = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.5 * g, rtol=0, atol=1e-15)


def test_lars_regular_first_and_second_step_by_hand():
    lr, wd, eta, mom = 0.7, 0.01, 1e-3, 0.9
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64))
    v = nn.Parameter(torch.randn(3, 2, dtype=torch.float64))
    opt = LARS([{"params": [w, v], "weight_decay": wd, "lars_exclude": False}], lr=lr, momentum=mom,
               weight_decay=wd, trust_coefficient=eta)
    g1 = _grads([w.shape, v.shape], 10)

    def scaled(p, g):
        d = g + wd * p
        return eta * p.norm() / d.norm() * d  # the trust ratio is per parameter tensor

    p0 = [w.detach().clone(), v.detach().clone()]
    u1 = [scaled(p, g) for p, g in zip(p0, g1)]
    w.grad, v.grad = g1[0].clone(), g1[1].clone()
    opt.step()
    for p, before, u in zip((w, v), p0, u1):
        torch.testing.assert_close(p.detach(), before - lr * u, rtol=1e-12, atol=1e-14)
    # the two tensors get different trust ratios (sanity check of the hand computation)
    r = [(eta * p.norm() / (g + wd * p).norm()).item() for p, g in zip(p0, g1)]
    assert abs(r[0] - r[1]) > 1e-6

    g2 = _grads([w.shape, v.shape], 11)
    p1 = [w.detach().clone(), v.detach().clone()]
    bufs = [mom * u + scaled(p, g) for u, p, g in zip(u1, p1, g2)]
    w.grad, v.grad = g2[0].clone(), g2[1].clone()
    opt.step()
    for p, before, buf in zip((w, v), p1, bufs):
        torch.testing.assert_close(p.detach(), before - lr * buf, rtol=1e-12, atol=1e-14)


def test_lars_zero_weight_uses_trust_one_and_skips_params_without_grad():
    z = nn.Parameter(torch.zeros(3, 3, dtype=torch.float64))
    idle = nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    opt = LARS([{"params": [z, idle], "weight_decay": 0.1, "lars_exclude": False}], lr=0.1, momentum=0.9,
               weight_decay=0.1)
    g = torch.full((3, 3), 2.0, dtype=torch.float64)
    z.grad = g.clone()
    opt.step()
    torch.testing.assert_close(z.detach(), -0.1 * g)  # ||p|| = 0: trust ratio 1
    assert torch.equal(idle.detach(), torch.ones(2, 2, dtype=torch.float64))
    assert idle not in opt.state


# -- build_optimizer ---------------------------------------------------------------------------
def test_build_optimizer_variants_and_unknown_name():
    net = Net()
    groups = parameter_groups([net], 1e-4)
    lars = build_optimizer("lars", groups, 0.5, 0.9, 1e-4, 1e-3)
    assert isinstance(lars, LARS)
    assert [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    sgd = build_optimizer("sgd", parameter_groups([net], 1e-4), 0.5, 0.9, 1e-4, 1e-3)
    assert isinstance(sgd, torch.optim.SGD)
    assert [g["weight_decay"] for g in sgd.param_groups] == [1e-4, 0.0]
    assert all("lars_exclude" not in g for g in sgd.param_groups)
    adamw = build_optimizer("adamw", parameter_groups([net], 1e-4), 1e-3, 0.9, 1e-4, 1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [1e-4, 0.0]
    with pytest.raises(ValueError, match="unknown optimizer 'adam'.*lars"):
        build_optimizer("adam", parameter_groups([net], 1e-4), 0.1, 0.9, 0.0, 1e-3)
