"""BYOL networks: the loss, the symmetric forward, the stop-gradient and the EMA target."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trainer.models import ARCHITECTURES, BYOL, STEMS, MLPHead, build_encoder, regression_loss, update_momentum


class TinyEncoder(nn.Module):
    """A small conv encoder with BatchNorm (like a ResNet's), cheap enough for many tests."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, dim, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


def tiny_byol(seed: int = 0) -> BYOL:
    torch.manual_seed(seed)
    return BYOL(TinyEncoder(16), 16, hidden_dim=32, projection_dim=8, predictor_hidden_dim=24)


def views(seed: int = 1, n: int = 6, s: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, s, s, generator=g), torch.randn(n, 3, s, s, generator=g)


# -- regression_loss ---------------------------------------------------------------------------
def test_regression_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    pn, zn = p.numpy().astype(np.float64), z.numpy().astype(np.float64)
    cos = (pn * zn).sum(1) / (np.linalg.norm(pn, axis=1) * np.linalg.norm(zn, axis=1))
    expected = np.mean(2 - 2 * cos)
    # the same as the mean squared distance between the l2-normalised vectors
    diff = pn / np.linalg.norm(pn, axis=1, keepdims=True) - zn / np.linalg.norm(zn, axis=1, keepdims=True)
    assert expected == pytest.approx(np.mean((diff ** 2).sum(1)), rel=1e-9)
    assert regression_loss(p, z).item() == pytest.approx(expected, rel=1e-5)


def test_regression_loss_range_and_extremes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 10, generator=g)
    y = torch.randn(64, 10, generator=g)
    value = regression_loss(x, y).item()
    assert 0.0 <= value <= 4.0
    assert regression_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert regression_loss(x, 3.5 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale invariant
    assert regression_loss(x, -x).item() == pytest.approx(4.0, abs=1e-5)
    # a scalar: the mean over the batch, not a per-sample vector
    assert regression_loss(x, y).shape == torch.Size([])


def test_regression_loss_stops_gradient_into_target():
    p = torch.randn(4, 5, requires_grad=True)
    z = torch.randn(4, 5, requires_grad=True)
    regression_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


# -- the BYOL module ---------------------------------------------------------------------------
def test_target_starts_as_copy_of_online_and_is_frozen():
    m = tiny_byol()
    for (n1, a), (n2, b) in zip(m.encoder.state_dict().items(), m.target_encoder.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    for a, b in zip(m.projector.parameters(), m.target_projector.parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()  # a copy, not shared storage
    target = list(m.target_parameters())
    assert target and all(not p.requires_grad for p in target)
    assert all(p.requires_grad for p in m.online_parameters())
    # online parameters are encoder + projector + predictor, disjoint from the target's
    assert {id(p) for p in m.online_parameters()}.isdisjoint({id(p) for p in target})
    n_online = sum(1 for _ in m.online_parameters())
    assert n_online == sum(1 for _ in m.encoder.parameters()) + sum(1 for _ in m.projector.parameters()) \
        + sum(1 for _ in m.predictor.parameters())


def test_predictor_shapes():
    m = tiny_byol()
    assert isinstance(m.projector, MLPHead) and isinstance(m.predictor, MLPHead)
    assert m.projector.net[0].in_features == 16 and m.projector.net[0].out_features == 32
    assert m.projector.net[-1].out_features == 8
    assert m.predictor.net[0].in_features == 8 and m.predictor.net[0].out_features == 24
    assert m.predictor.net[-1].out_features == 8


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_is_symmetric_loss_from_submodules(mode):
    m = tiny_byol()
    # make the target differ from the online network so that a mixed-up branch would show
    with torch.no_grad():
        for p in m.target_parameters():
            p.add_(0.05 * torch.randn_like(p))
    m.train(mode == "train")
    v1, v2 = views()
    loss, projection = m(v1, v2)
    with torch.no_grad():
        z1, z2 = m.projector(m.encoder(v1)), m.projector(m.encoder(v2))
        p1, p2 = m.predictor(z1), m.predictor(z2)
        t1 = m.target_projector(m.target_encoder(v1))
        t2 = m.target_projector(m.target_encoder(v2))
    expected = regression_loss(p1, t2) + regression_loss(p2, t1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # not the same-view pairing, not the average of the two terms
    wrong = regression_loss(p1, t1) + regression_loss(p2, t2)
    assert abs(loss.item() - wrong.item()) > 1e-4
    assert torch.allclose(projection, z1, atol=1e-5) and not projection.requires_grad
    swapped, _ = m(v2, v1)
    assert swapped.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    assert 0.0 <= loss.item() <= 8.0


def test_backward_reaches_online_but_never_target():
    m = tiny_byol().train()
    v1, v2 = views()
    loss, _ = m(v1, v2)
    loss.backward()
    for p in m.target_parameters():
        assert p.grad is None
        assert not p.requires_grad
    for name, module in (("encoder", m.encoder), ("projector", m.projector), ("predictor", m.predictor)):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), name
        assert sum(g.abs().sum().item() for g in grads) > 0, name


# -- the EMA update ----------------------------------------------------------------------------
def _pair(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    online = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(dtype)
    target = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(dtype)
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(torch.randn_like(p))
        for p in online.parameters():
            p.copy_(torch.randn_like(p))
    return online, target


@pytest.mark.parametrize("tau", [0.996, 0.9, 0.5, torch.tensor(0.75, dtype=torch.float64)])
def test_update_momentum_matches_manual_ema(tau):
    online, target = _pair()
    t = float(tau)
    expected = [t * xi.detach().clone() + (1 - t) * theta.detach() for xi, theta in
                zip(target.parameters(), online.parameters())]
    online_before = [p.detach().clone() for p in online.parameters()]
    update_momentum(online, target, tau)
    for got, want in zip(target.parameters(), expected):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-12)
    for p, before in zip(online.parameters(), online_before):
        assert torch.equal(p.detach(), before)  # the online network is never touched


def test_update_momentum_tau_one_and_zero():
    online, target = _pair()
    before = [p.detach().clone() for p in target.parameters()]
    update_momentum(online, target, 1.0)
    for p, b in zip(target.parameters(), before):
        assert torch.equal(p.detach(), b)
    update_momentum(online, target, 0.0)
    for p, o in zip(target.parameters(), online.parameters()):
        assert torch.equal(p.detach(), o.detach())


def test_byol_update_target_moves_encoder_and_projector_only():
    m = tiny_byol()
    with torch.no_grad():
        for p in m.online_parameters():
            p.add_(torch.randn_like(p))
    tau = 0.9
    want_enc = [tau * t.detach() + (1 - tau) * o.detach() for t, o in
                zip(m.target_encoder.parameters(), m.encoder.parameters())]
    want_proj = [tau * t.detach() + (1 - tau) * o.detach() for t, o in
                 zip(m.target_projector.parameters(), m.projector.parameters())]
    predictor_before = [p.detach().clone() for p in m.predictor.parameters()]
    m.update_target(tau)
    for got, want in zip(list(m.target_encoder.parameters()) + list(m.target_projector.parameters()),
                         want_enc + want_proj):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
    for p, b in zip(m.predictor.parameters(), predictor_before):
        assert torch.equal(p.detach(), b)


# -- encoders ----------------------------------------------------------------------------------
def test_resnet18_small_stem_keeps_32px_to_layer1():
    torch.manual_seed(0)
    enc, dim = build_encoder("resnet18", "small")
    assert dim == 512
    assert enc.conv1.kernel_size == (3, 3) and enc.conv1.stride == (1, 1)
    assert isinstance(enc.maxpool, nn.Identity) and isinstance(enc.fc, nn.Identity)
    shapes = {}
    hooks = [getattr(enc, name).register_forward_hook(lambda mod, i, o, name=name: shapes.__setitem__(name, o.shape))
             for name in ("layer1", "layer4")]
    enc.eval()
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes["layer1"] == torch.Size([2, 64, 32, 32])
    assert shapes["layer4"] == torch.Size([2, 512, 4, 4])
    assert out.shape == torch.Size([2, 512])


def test_resnet18_imagenet_stem_downsamples_by_four():
    enc, dim = build_encoder("resnet18", "imagenet")
    assert dim == 512 and enc.conv1.stride == (2, 2) and not isinstance(enc.maxpool, nn.Identity)
    shapes = {}
    enc.layer1.register_forward_hook(lambda mod, i, o: shapes.__setitem__("layer1", o.shape))
    with torch.no_grad():
        out = enc.eval()(torch.randn(1, 3, 64, 64))
    assert shapes["layer1"] == torch.Size([1, 64, 16, 16]) and out.shape == torch.Size([1, 512])


def test_resnet50_embedding_dim():
    _, dim = build_encoder("resnet50", "small")
    assert dim == 2048


def test_unknown_architecture_and_stem_raise_naming_the_choices():
    with pytest.raises(ValueError) as e:
        build_encoder("resnet7")
    msg = str(e.value)
    assert "resnet7" in msg and all(a in msg for a in ARCHITECTURES)
    with pytest.raises(ValueError) as e:
        build_encoder("resnet18", "tiny")
    assert "tiny" in str(e.value) and all(s in str(e.value) for s in STEMS)


@pytest.mark.parametrize("arch,width", [("resnet18_w32", 32), ("resnet18_w16", 16)])
def test_narrow_resnet18_scales_every_stage(arch, width):
    enc, dim = build_encoder(arch, "small")
    full, _ = build_encoder("resnet18", "small")
    assert dim == 8 * width
    # the same modules under the same names, so checkpoints and exports treat it as a ResNet-18
    assert enc.state_dict().keys() == full.state_dict().keys()
    assert [enc.get_submodule(f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3, 4)] == \
        [width, 2 * width, 4 * width, 8 * width]
    assert enc(torch.randn(2, 3, 24, 24)).shape == (2, dim)
    n_narrow = sum(p.numel() for p in enc.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert n_narrow < n_full * (width / 64) ** 2 * 1.1  # parameters shrink with the width squared
    conv = enc.layer3[1].conv2.weight
    assert 0.5 < conv.std().item() / (2 / (conv.shape[0] * 9)) ** 0.5 < 1.5  # torchvision's kaiming init
