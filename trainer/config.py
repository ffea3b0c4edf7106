"""Run configuration: named presets, command-line overrides, and the JSON saved with each run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from contract.errors import UsageError
from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocessing

from . import settings


@dataclass
class ModelConfig:
    arch: str = "resnet50"
    stem: str = "imagenet"            # "small": 3x3 stride-1 stem, no max-pool (32-96 px images)
    projector_hidden_dim: int = 4096
    projection_dim: int = 256
    predictor_hidden_dim: int = 4096


@dataclass
class DataConfig:
    image_size: int = 224             # side of the training views (and of the encoder's input: see eval_size)
    resize_size: int = 0              # evaluation resize before the centre crop; 0: derived
    eval_size: int = 0                # the encoder's input side after training; 0: image_size. Larger than the
                                      # views, it sees objects at the size the random crops showed them ("FixRes")
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))
    blur: bool = True                 # small-image presets drop the Gaussian blur
    crop_scale_min: float = 0.08
    color_strength: float = 1.0       # scales the colour-jitter magnitudes (1: the paper's)
    grayscale_p: float = 0.2
    pipeline: str = "auto"            # memory | stream | auto (memory for small data sets)
    workers: int = 8

    def preprocessing(self) -> Preprocessing:
        """The inference contract, saved with the encoder."""
        pre = Preprocessing.for_image_size(self.eval_size or self.image_size, self.mean, self.std)
        return dataclasses.replace(pre, resize_size=self.resize_size) if self.resize_size else pre

    def train_preprocessing(self) -> Preprocessing:
        """What training decodes the images to before its random crops: the contract at image_size."""
        return dataclasses.replace(self, eval_size=0).preprocessing()


@dataclass
class OptimConfig:
    name: str = "lars"                # lars | sgd | adamw
    base_lr: float = 0.2              # LR = base_lr * batch_size / 256
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    trust_coefficient: float = 1e-3
    warmup_epochs: float = 10
    batch_size: int = 4096            # global batch (all processes, all accumulation steps)
    epochs: int = 300
    max_steps: int = 0                # > 0: stop after this many optimiser steps instead
    accumulate: int = 1               # gradient accumulation steps per optimiser step
    time_budget_s: float = 0          # > 0: fit the run into this many seconds of training
    schedule_start: int = 0           # the step where the LR and tau schedules begin (--extend: a warm restart)
    predictor_lr_scale: float = 1.0   # the predictor's LR relative to the rest (paper: 1); a faster
                                      # predictor speeds up short runs (as in DirectPred / SimSiam)


@dataclass
class ByolConfig:
    tau_base: float = 0.996


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    channels_last: bool = True
    compile: bool = False
    checkpoint_every: int = 0         # optimiser steps between checkpoints (0: by time only)
    checkpoint_every_s: float = 300   # a checkpoint at the latest this many seconds after the last (0: off)
    log_every: int = 10
    knn_every: int = 0                # epochs between kNN monitor runs (needs --val-data); 0: end only
    knn_max_images: int = 0           # kNN memory and queries, each a seeded sample of at most this many
                                      # images (0: as many as 2 GiB of uint8 images at the input size hold)
    knn_k: int = 200
    knn_temperature: float = 0.1


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    byol: ByolConfig = field(default_factory=ByolConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preset: str = ""

    def to_dict(self) -> dict:
        return settings.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return settings.from_dict(cls, d)

    def dumps(self) -> str:
        return settings.dumps(self)


def _imagenet_resnet50() -> Config:
    """The paper's ImageNet setting (Grill et al. 2020, sec. 3.2 and appendix C)."""
    return Config(preset="imagenet-resnet50")


def _cifar10_resnet18() -> Config:
    """CIFAR-10 at 32 px, ResNet-18 with the small-image stem (LARS 1.0, wd 1e-5, tau 0.99, batch 256)."""
    return Config(
        preset="cifar10-resnet18",
        model=ModelConfig(arch="resnet18", stem="small"),
        data=DataConfig(image_size=32, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD), blur=False),
        optim=OptimConfig(base_lr=1.0, weight_decay=1e-5, batch_size=256, epochs=800),
        byol=ByolConfig(tau_base=0.99),
    )


def _cpu_quick() -> Config:
    """Ten minutes on two CPU cores that visibly learn (see BENCHMARKS.md for the design runs).

    Many epochs of a thin network rather than a fraction of one of a wide one: a ResNet-18 at a
    quarter of the width (1/16 of the multiply-adds) on 24 px views; a target that moves fast
    (tau 0.9) and a predictor that learns 10x faster than the rest, which together made the
    largest difference in the design runs; bf16 autocast, which this kind of AVX-512 CPU runs
    about twice as fast as float32.
    """
    return Config(
        preset="cpu-quick",
        model=ModelConfig(arch="resnet18_w16", stem="small", projector_hidden_dim=1024, predictor_hidden_dim=1024),
        data=DataConfig(image_size=24, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD), blur=False,
                        crop_scale_min=0.2, workers=1),
        optim=OptimConfig(base_lr=1.0, weight_decay=1e-5, batch_size=128, epochs=12, warmup_epochs=0.5,
                          predictor_lr_scale=10.0),
        byol=ByolConfig(tau_base=0.9),
        run=RunConfig(device="cpu", precision="bf16", checkpoint_every=200),
    )


def _cpu_photos() -> Config:
    """Three minutes of photographs on two CPU cores (the main job's preset; see BENCHMARKS.md).

    cpu-quick's recipe (quarter-width ResNet-18, tau 0.9, predictor at 10x the LR, bf16) with
    what the design runs on the shipped flowers found: the ImageNet stem, which quarters the
    resolution at once (the small-image stem is several times slower at these sizes), on 48 px
    views; batch 32, for three to four times the steps of batch 128 at about the same images/s;
    weak colour jitter and no grayscale, since a photo's colours are part of what it shows; the
    paper's crops (down to 8% of the photo); the whole time budget used (the step count refitted
    as the run goes); and the trained encoder used at 96 px, twice its training views (the crops
    showed it objects larger than the whole photo shows them at 48 px: "FixRes").
    """
    quick = _cpu_quick()
    return dataclasses.replace(
        quick,
        preset="cpu-photos",
        model=dataclasses.replace(quick.model, stem="imagenet"),
        data=DataConfig(image_size=48, eval_size=96, blur=False, crop_scale_min=0.08, color_strength=0.2,
                        grayscale_p=0.0, workers=1),
        optim=dataclasses.replace(quick.optim, batch_size=32, epochs=200, warmup_epochs=2),
    )


def _gpu_photos() -> Config:
    """The main job on a CUDA device: a full-width ResNet-18 on 96 px views of photographs."""
    return Config(
        preset="gpu-photos",
        model=ModelConfig(arch="resnet18", stem="imagenet", projector_hidden_dim=2048, predictor_hidden_dim=2048),
        data=DataConfig(image_size=96, blur=True, crop_scale_min=0.2, workers=4),
        optim=OptimConfig(base_lr=1.0, weight_decay=1e-5, batch_size=256, epochs=400, warmup_epochs=5,
                          predictor_lr_scale=10.0),
        byol=ByolConfig(tau_base=0.99),
        run=RunConfig(device="cuda", precision="bf16", checkpoint_every=200),
    )


PRESETS = {"imagenet-resnet50": _imagenet_resnet50, "cifar10-resnet18": _cifar10_resnet18, "cpu-quick": _cpu_quick,
           "cpu-photos": _cpu_photos, "gpu-photos": _gpu_photos}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def apply_override(config: Config, assignment: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as JSON when it can be."""
    settings.apply_override(config, assignment)
