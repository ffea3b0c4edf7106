"""Encoder sources: what every command that takes an encoder (evaluate, detect, segment, depth, export)
accepts, with one grammar.

    RUN_DIR | checkpoint.pt | encoder.safetensors     a trained encoder (trainer.checkpoint.load_encoder)
    random:PATH                                       random weights, PATH's architecture and contract
    random:ARCH[:STEM[:SIZE]]                         random weights, e.g. random:resnet18:small:32
    supervised:ARCH                                   torchvision's ImageNet weights (from the hub cache)
"""
from __future__ import annotations

from pathlib import Path

import torch

from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from .checkpoint import CheckpointError, load_encoder, weights_fingerprint
from .models import ARCHITECTURES, STEMS, build_encoder

RANDOM_PREFIX = "random:"
SUPERVISED_PREFIX = "supervised:"
ENCODER_SOURCE_HELP = ("a run directory, checkpoint.pt or encoder.safetensors; random:PATH for a randomly "
                       "initialised encoder of the same architecture and preprocessing as PATH; "
                       "random:ARCH[:STEM[:SIZE]] (e.g. random:resnet18:small:32); or supervised:ARCH for "
                       "torchvision's ImageNet weights, when they are already in the torch hub cache")


def default_preprocessing(stem: str, size: int | None = None) -> Preprocessing:
    """The contract a fresh encoder gets: ImageNet statistics at 224 px, or CIFAR's at 32 px for the small stem."""
    if stem == "small":
        return Preprocessing.for_image_size(size or 32, CIFAR10_MEAN, CIFAR10_STD)
    return Preprocessing.for_image_size(size or 224, IMAGENET_MEAN, IMAGENET_STD)


def parse_random_spec(spec: str) -> tuple[str, str, int | None]:
    """"random:resnet18:small:32" -> ("resnet18", "small", 32); stem defaults to imagenet, size to None."""
    parts = spec[len(RANDOM_PREFIX):].split(":")
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise CheckpointError(f"expected random:ARCH[:STEM[:SIZE]] or random:PATH, got {spec!r}")
    arch, stem = parts[0], (parts[1] if len(parts) > 1 and parts[1] else "imagenet")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r} in {spec!r}; choose one of {', '.join(ARCHITECTURES)}")
    if stem not in STEMS:
        raise CheckpointError(f"unknown stem {stem!r} in {spec!r}; choose one of {', '.join(STEMS)}")
    size = None
    if len(parts) > 2:
        try:
            size = int(parts[2])
        except ValueError:
            raise CheckpointError(f"input size must be an integer in {spec!r}") from None
        if not 8 <= size <= 1024:
            raise CheckpointError(f"input size {size} in {spec!r} is outside 8-1024")
    return arch, stem, size


def resolve_random(spec: str) -> tuple[str, str, Preprocessing]:
    """random:PATH (the architecture and contract of the encoder at PATH) or random:ARCH[:STEM[:SIZE]]
    -> (arch, stem, preprocessing) of the randomly initialised encoder it names."""
    rest = spec[len(RANDOM_PREFIX):]
    if Path(rest).exists():  # same architecture and contract as a trained encoder
        _, ref = load_encoder(rest)
        return ref["arch"], ref["stem"], ref["preprocessing"]
    arch, stem, size = parse_random_spec(spec)
    return arch, stem, default_preprocessing(stem, size)


def random_encoder(arch: str, stem: str, seed: int) -> tuple[torch.nn.Module, int]:
    """A freshly initialised encoder, the same for the same seed; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_encoder(arch, stem)


def open_encoder(source: str | Path, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """Any encoder source (see ENCODER_SOURCE_HELP) -> (encoder in eval mode, info as load_encoder's).

    info["source"] says which kind it was: "byol", "random" or "supervised".
    """
    spec = str(source)
    if spec.startswith(RANDOM_PREFIX):
        arch, stem, pre = resolve_random(spec)
        encoder, dim = random_encoder(arch, stem, seed)
        info = {"arch": arch, "stem": stem, "embedding_dim": dim, "preprocessing": pre, "step": 0,
                "fingerprint": weights_fingerprint(encoder.state_dict()), "source": "random"}
        return encoder.eval(), info
    if spec.startswith(SUPERVISED_PREFIX):
        return _torchvision_supervised(spec[len(SUPERVISED_PREFIX):])
    encoder, info = load_encoder(spec)
    info["source"] = "byol"
    return encoder, info


def _torchvision_supervised(arch: str) -> tuple[torch.nn.Module, dict]:
    """torchvision's ImageNet-supervised weights, read from the hub cache only (never downloaded)."""
    import torchvision
    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise CheckpointError(f"torchvision has no supervised weights for {arch!r}") from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise CheckpointError(f"torchvision's supervised {arch} weights are not in the local cache ({cached}); "
                              f"byolkit does not download them: fetch {weights.url} there first")
    encoder, dim = build_encoder(arch, "imagenet")
    state = {k: v for k, v in torch.load(cached, map_location="cpu", weights_only=True).items()
             if not k.startswith("fc.")}
    encoder.load_state_dict(state)
    pre = Preprocessing.for_image_size(224, IMAGENET_MEAN, IMAGENET_STD)
    info = {"arch": arch, "stem": "imagenet", "embedding_dim": dim, "preprocessing": pre, "step": 0,
            "fingerprint": weights_fingerprint(encoder.state_dict()), "source": "supervised"}
    return encoder.eval(), info
