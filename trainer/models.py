"""BYOL's networks: encoder, projector and predictor heads, the loss and the momentum update.

online: encoder -> projector -> predictor      (trained by the optimiser)
target: encoder -> projector                   (no gradients; EMA of the online weights)
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# Narrow ResNet-18s: the same network with every stage's width scaled (base width 32 or 16
# instead of 64; about 1/4 or 1/16 of the multiply-adds). For CPU budgets, where more epochs of
# a thinner network learn more than a fraction of an epoch of the full one (BENCHMARKS.md).
NARROW_RESNET18 = {"resnet18_w32": 32, "resnet18_w16": 16}
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                 *NARROW_RESNET18)
STEMS = ("imagenet", "small")


def _narrow_resnet18(width: int) -> torchvision.models.ResNet:
    """torchvision's ResNet-18 with stage widths (w, 2w, 4w, 8w): same modules, same state-dict keys."""
    net = torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2])
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(torchvision.models.resnet.BasicBlock, width, 2)
    for i, mult in ((2, 2), (3, 4), (4, 8)):
        setattr(net, f"layer{i}", net._make_layer(torchvision.models.resnet.BasicBlock, width * mult, 2, stride=2))
    net.fc = nn.Linear(8 * width, 1000)
    for m in net.modules():  # torchvision's initialisation, for the replaced modules
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def build_encoder(arch: str, stem: str = "imagenet") -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier; returns (module, embedding size).

    stem="small" is the variant for 32-96 px images: a 3x3 stride-1 first convolution and no
    max-pool, so that a 32 px image still reaches the last stage at 4x4.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    if arch in NARROW_RESNET18:
        net = _narrow_resnet18(NARROW_RESNET18[arch])
    else:
        net = getattr(torchvision.models, arch)(weights=None)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class MLPHead(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear, the paper's projector and predictor."""

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                                 nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, x):
        return self.net(x)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z): the normalised MSE, averaged over the batch; z carries no gradient."""
    p = F.normalize(p.float(), dim=-1)
    z = F.normalize(z.detach().float(), dim=-1)
    return (2 - 2 * (p * z).sum(-1)).mean()


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, tau: float | torch.Tensor):
    """xi <- tau * xi + (1 - tau) * theta, for every parameter, in one fused op."""
    online_params, target_params = list(online.parameters()), list(target.parameters())
    torch._foreach_lerp_(target_params, online_params, 1 - tau)


class BYOL(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, hidden_dim: int = 4096,
                 projection_dim: int = 256, predictor_hidden_dim: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.projector = MLPHead(feature_dim, hidden_dim, projection_dim)
        self.predictor = MLPHead(projection_dim, predictor_hidden_dim or hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def online_parameters(self):
        for m in (self.encoder, self.projector, self.predictor):
            yield from m.parameters()

    def target_parameters(self):
        for m in (self.target_encoder, self.target_projector):
            yield from m.parameters()

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        """Symmetric BYOL loss: each view's prediction regresses the other view's target.

        The two view orders are summed (the paper's L + L~), not averaged. Each view passes
        through the networks on its own so that BatchNorm sees one view per batch, as in the
        paper's implementation; the target runs in training mode too (batch statistics).
        """
        z1, z2 = self.projector(self.encoder(view1)), self.projector(self.encoder(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_encoder(view1))
            t2 = self.target_projector(self.target_encoder(view2))
        return regression_loss(p1, t2) + regression_loss(p2, t1), z1.detach()

    @torch.no_grad()
    def update_target(self, tau):
        update_momentum(self.encoder, self.target_encoder, tau)
        update_momentum(self.projector, self.target_projector, tau)
