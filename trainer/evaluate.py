"""Evaluation protocols for encoders: kNN, linear, semi-supervised fine-tuning, transfer.

    python -m trainer.evaluate knn      --encoder runs/quick --train cifar10/train.zip --test cifar10/test.zip
    python -m trainer.evaluate linear   --encoder runs/quick --train ... --test ... [--fast]
    python -m trainer.evaluate semi     --encoder runs/quick --train ... --test ... --fraction 0.1
    python -m trainer.evaluate transfer --encoder runs/quick --train flowers/train --test flowers/test

The protocols, as BYOL (Grill et al. 2020, appendix C) and its predecessors measure encoders:
  knn       weighted kNN on the frozen encoder's embeddings (k=200, T=0.1, cosine; Wu et al. 2018).
  linear    a linear classifier on the frozen encoder (BatchNorm statistics frozen too), trained with
            SGD + Nesterov momentum and cross-entropy on random-resized-crop + flip views, tested on
            the contract's resize + centre crop. `--fast`: the classifier trains on cached test-time
            features instead (no augmentation): seconds instead of minutes or hours.
  semi      the whole network (encoder + a new linear head) fine-tuned on a class-balanced labelled
            subset (--fraction of every class, chosen by --seed and written out), tested on the full
            test split. `--encoder random:PATH` is training the same network from scratch.
  transfer  linear (fast unless --augment) and fine-tuned evaluation on another labelled data set.

Each run writes its metrics as JSON (atomically) into an `eval/` folder beside the encoder
(`eval/<protocol>[-random].json`; see --out) and prints a one-line summary. The long loops
(augmented linear, fine-tuning) checkpoint after every epoch; `--resume` continues them.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contract.preprocess import Preprocessing, normalize_unit_tensor

from . import __version__, settings, sources
from . import checkpoint as ckpt_io
from .augment import ViewAugmentation, crop_resize_batch
from .data import BatchPlan, DataError, ImageCollection, SubsetCollection, decode_all, open_collection
from .knn import embed, knn_accuracy
from .optim import parameter_groups, warmup_cosine
from .runtime import UsageError, cli_main, log, resolve_device
from .settings import add_set_flag

PROTOCOLS = ("knn", "linear", "semi", "transfer")


# ============================================================================================
# Labelled data
# ============================================================================================
def open_labelled(train_spec: str, test_spec: str) -> tuple[ImageCollection, ImageCollection, torch.Tensor]:
    """Both splits, checked before any decoding -> (train, test, test-to-train class index map)."""
    train, test = open_collection(train_spec), open_collection(test_spec)
    for spec, c in ((train_spec, train), (test_spec, test)):
        if c.labels is None:
            raise DataError(f"{spec} has no labels: evaluation needs one sub-folder per class "
                            "(ImageFolder layout) or a torchvision data set")
        if any(y < 0 for y in c.labels):
            raise DataError(f"{spec} holds unlabelled images (label -1); pass a labelled split")
    if train.classes and test.classes:
        unseen = sorted(set(test.classes) - set(train.classes))
        if unseen:
            shown = ", ".join(unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise DataError(f"{test_spec} has {len(unseen)} class(es) that {train_spec} lacks: {shown}")
        remap = torch.tensor([train.classes.index(c) for c in test.classes])
    else:
        remap = torch.arange(max(test.labels) + 1)
    if len(set(train.labels)) < 2:
        raise DataError(f"{train_spec} has a single class; a classifier needs at least two")
    return train, test, remap


def num_classes_of(train: ImageCollection) -> int:
    return max(len(train.classes), max(train.labels) + 1)


def balanced_subset(labels: list[int], fraction: float, seed: int) -> list[int]:
    """The same fraction of every class (at least one image each), chosen by a seeded
    permutation per class: the same labels, fraction and seed always give the same subset.
    Returns sorted indices."""
    if not 0 < fraction <= 1:
        raise UsageError(f"the label fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    chosen = []
    for y in sorted(by_class):
        members = by_class[y]
        k = max(1, round(fraction * len(members)))
        g = torch.Generator().manual_seed(seed * 1_000_003 + y)
        perm = torch.randperm(len(members), generator=g)[:k]
        chosen.extend(members[i] for i in perm.tolist())
    return sorted(chosen)


def write_subset(path: Path, collection: ImageCollection, indices: list[int], fraction: float, seed: int,
                 data_spec: str) -> None:
    per_class: dict[str, int] = {}
    for i in indices:
        y = collection.labels[i]
        name = collection.classes[y] if collection.classes else str(y)
        per_class[name] = per_class.get(name, 0) + 1
    record = {"data": str(data_spec), "fraction": fraction, "seed": seed, "count": len(indices),
              "per_class": per_class, "images": [collection.name(i) for i in indices]}
    ckpt_io.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))


@dataclass
class Split:
    images: torch.Tensor   # uint8 [N, 3, S, S]
    labels: torch.Tensor   # int64 [N], indices into the training classes
    skipped: int


def decode_split(collection: ImageCollection, pre: Preprocessing, workers: int, progress: bool, desc: str,
                 remap: torch.Tensor | None = None) -> Split:
    images, labels, skipped = decode_all(collection, pre, workers=workers, progress=progress, desc=desc)
    if len(images) == 0:
        raise DataError(f"no readable images in {collection.description}")
    if remap is not None:
        labels = remap[labels]
    return Split(images, labels.long(), skipped)


def training_crop_source(pre: Preprocessing) -> Preprocessing:
    """What training views are cropped from: the resized image's central square, so that random
    crops see more than the test-time centre crop (identical for small images used whole)."""
    return dataclasses.replace(pre, input_size=pre.resize_size)


# ============================================================================================
# Protocols (library functions: tensors in, metrics out)
# ============================================================================================
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    labels = labels.to(top.device)
    return {"top1": (top[:, 0] == labels).float().mean().item(),
            "top5": (top == labels[:, None]).any(1).float().mean().item()}


@dataclass
class Schedule:
    """SGD with Nesterov momentum and a cosine LR (no restarts), the same for every side compared."""
    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.1                 # at batch_size; the head's LR when fine-tuning
    weight_decay: float = 0.0
    momentum: float = 0.9
    encoder_lr_scale: float = 1.0   # fine-tuning: the encoder's LR relative to the head's
    warmup_epochs: float = 0.0

    def to_dict(self):
        return dataclasses.asdict(self)


def _sgd(groups: list[dict], sched: Schedule) -> torch.optim.SGD:
    return torch.optim.SGD(groups, lr=sched.lr, momentum=sched.momentum, nesterov=True)


def linear_eval_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                         num_classes: int, sched: Schedule, seed: int = 0, progress: bool = False) -> dict:
    """The fast linear protocol: a linear classifier on cached features.

    Features are standardised with the training set's mean and std (a BatchNorm without affine
    parameters in front of the classifier, folded in as MoCo v3 does): the LR then suits any
    encoder's feature scale, so trained and random encoders are compared on the same schedule.
    """
    from tqdm import tqdm
    device = train_x.device
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = _sgd([{"params": head.parameters(), "weight_decay": sched.weight_decay, "lr_scale": 1.0}], sched)
    batch = min(sched.batch_size, len(train_x))
    plan = BatchPlan(len(train_x), batch, seed, device=device)
    total = sched.epochs * plan.steps_per_epoch
    lr_at = warmup_cosine(sched.lr, total, int(sched.warmup_epochs * plan.steps_per_epoch))
    for step in tqdm(range(total), desc="linear (cached features)", disable=not progress, leave=False):
        idx = plan.indices(step)
        for g in opt.param_groups:
            g["lr"] = float(lr_at[step])
        loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        metrics = topk_accuracy(head(test_x), test_y)
        metrics["train_top1"] = topk_accuracy(head(train_x), train_y)["top1"]
    return metrics


class Classifier(nn.Module):
    """Encoder + linear head; with `frozen`, the encoder stays in eval mode and gets no gradients."""

    def __init__(self, encoder: nn.Module, dim: int, num_classes: int, frozen: bool):
        super().__init__()
        self.encoder, self.head, self.frozen = encoder, nn.Linear(dim, num_classes), frozen
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        # the same encoder object may have served a frozen protocol first (transfer)
        self.encoder.requires_grad_(not frozen)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.encoder.eval()  # BatchNorm keeps the pretrained statistics
        return self

    def forward(self, x):
        if self.frozen:
            with torch.no_grad():
                feats = self.encoder(x)
            return self.head(feats.float())
        return self.head(self.encoder(x))

    def trainable_state(self) -> dict:
        return self.head.state_dict() if self.frozen else self.state_dict()

    def load_trainable_state(self, state: dict) -> None:
        (self.head if self.frozen else self).load_state_dict(state)


def train_classifier(model: Classifier, train: Split, test: Split, pre: Preprocessing, sched: Schedule, *,
                     device: torch.device, precision: str = "fp32", crop_scale_min: float = 0.08, seed: int = 0,
                     checkpoint: Path | None = None, resume: bool = False, fingerprint: str = "",
                     stop_after: int = 0, progress: bool = False, desc: str = "training") -> dict | None:
    """Train `model` (a frozen encoder's head, or everything) on augmented views, then test it.

    Views: random resized crop (scale [crop_scale_min, 1], torchvision's ratios) + horizontal flip of
    `train.images`, batched on the device; test: the contract's resize + centre crop (`test.images`).
    After every epoch the trainable weights, optimiser and RNG state go to `checkpoint` atomically;
    `resume` continues from it. `stop_after` > 0 stops (checkpointed) after that many epochs of this
    call and returns None. Returns top-1/top-5 on `test`.
    """
    from tqdm import tqdm
    size = pre.input_size
    torch.manual_seed(seed)
    model.to(device)
    if model.frozen:
        groups = [{"params": list(model.head.parameters()), "weight_decay": sched.weight_decay, "lr_scale": 1.0}]
    else:
        groups = (parameter_groups([model.encoder], sched.weight_decay, sched.encoder_lr_scale)
                  + parameter_groups([model.head], sched.weight_decay, 1.0))
        groups = [{k: v for k, v in g.items() if k != "lars_exclude"} for g in groups if g["params"]]
    opt = _sgd(groups, sched)
    batch = min(sched.batch_size, len(train.images))
    plan = BatchPlan(len(train.images), batch, seed, device=device)
    total = sched.epochs * plan.steps_per_epoch
    lr_at = warmup_cosine(sched.lr, total, round(sched.warmup_epochs * plan.steps_per_epoch))
    view = ViewAugmentation(crop_scale=(crop_scale_min, 1.0))
    mean = torch.tensor(pre.mean, device=device)
    std = torch.tensor(pre.std, device=device)
    images, labels = train.images.to(device), train.labels.to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    epoch0 = 0
    identity = {"schedule": sched.to_dict(), "crop_scale_min": crop_scale_min, "seed": seed,
                "fingerprint": fingerprint, "frozen": model.frozen, "num_train": len(train.images)}
    if resume and checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many kinds (UnpicklingError, RuntimeError...)
            raise UsageError(f"cannot resume from {checkpoint}: not a readable checkpoint ({type(e).__name__}); "
                             "delete it or drop --resume") from None
        if not isinstance(state, dict) or not {"settings", "model", "optimizer", "rng", "epoch"} <= state.keys():
            raise UsageError(f"cannot resume from {checkpoint}: not an evaluation checkpoint; delete it or drop "
                             "--resume")
        if state["settings"] != identity:
            raise UsageError(f"cannot resume from {checkpoint}: it was started with other settings or another "
                             "encoder; delete it or drop --resume")
        model.load_trainable_state(state["model"])
        opt.load_state_dict(state["optimizer"])
        ckpt_io.set_rng_state(state["rng"])
        epoch0 = int(state["epoch"])
    elif resume and checkpoint is not None:
        log(None, f"--resume: no checkpoint at {checkpoint} yet, starting from scratch")
    bar = tqdm(total=total, initial=epoch0 * plan.steps_per_epoch, desc=desc, unit="step", disable=not progress,
               dynamic_ncols=True)
    model.train()
    for epoch in range(epoch0, sched.epochs):
        loss_sum = torch.zeros((), device=device)
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            idx = plan.indices(step)
            with torch.no_grad():
                x = crop_resize_batch(images[idx], size, view)
                x = normalize_unit_tensor(x, mean, std).contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = float(lr_at[step]) * g["lr_scale"]
            with amp:
                loss = F.cross_entropy(model(x).float(), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            bar.update(1)
        epoch_loss = loss_sum.item() / plan.steps_per_epoch  # one host synchronisation per epoch
        bar.set_postfix(epoch=epoch + 1, loss=f"{epoch_loss:.3f}")
        if checkpoint is not None and epoch + 1 < sched.epochs:
            payload = {"model": model.trainable_state(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                       "rng": ckpt_io.rng_state(), "settings": identity, "byolkit_version": __version__}
            ckpt_io.atomic_write(checkpoint, lambda tmp, payload=payload: torch.save(payload, tmp))
        if stop_after and epoch + 1 - epoch0 >= stop_after and epoch + 1 < sched.epochs:
            bar.close()
            return None
    bar.close()
    logits = embed(model, test.images, pre, device, precision=precision, progress=progress, desc="testing")
    metrics = {**topk_accuracy(logits, test.labels), "last_epoch_train_loss": epoch_loss}
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # finished: the metrics file is the result
    return metrics


# ============================================================================================
# Command line
# ============================================================================================
def _parse(text: str, kind, what: str):
    """`kind(text)`, or argparse's error "not <what>: 'text'"."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _fraction(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the label fraction must be in (0, 1] (e.g. 0.01 or 0.1), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = _parse(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure an encoder with the standard protocols (kNN, linear, semi-supervised, transfer).",
        epilog=__doc__.split("\n\n", 2)[2])
    sub = p.add_subparsers(dest="protocol", required=True, metavar="{" + ",".join(PROTOCOLS) + "}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--encoder", required=True, help=sources.ENCODER_SOURCE_HELP)
    common.add_argument("--train", required=True, help="labelled training images: a folder with one sub-folder per "
                        "class, a zip archive of one, or cifar10 / cifar100 / stl10")
    common.add_argument("--test", required=True, help="labelled test images, same forms (e.g. cifar10:test); "
                        "every test class must occur in --train")
    common.add_argument("--out", type=Path, help="metrics JSON file (default: <encoder's folder>/eval/<protocol>"
                        "[-<tag>].json; required for random:ARCH and supervised:ARCH encoders)")
    common.add_argument("--tag", default="", help="added to the default metrics file name (e.g. a data set name)")
    common.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    common.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 autocast on a GPU, fp32 on the CPU")
    common.add_argument("--workers", type=int, default=2, help="image-decoding processes")
    common.add_argument("--seed", type=int, default=0, help="seeds the classifier, the views, the subset and "
                        "random:... encoders")
    add_set_flag(common)
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    def schedule_args(sp, epochs, lr, batch, wd, what):
        sp.add_argument("--epochs", type=_positive_int, default=epochs, help=f"{what} epochs (default {epochs})")
        sp.add_argument("--lr", type=float, default=lr, help=f"peak LR of the cosine schedule (default {lr})")
        sp.add_argument("--batch-size", type=_positive_int, default=batch, help=f"default {batch}")
        sp.add_argument("--weight-decay", type=float, default=wd, help=f"default {wd}")

    def long_run_args(sp):
        sp.add_argument("--crop-scale-min", type=float, default=None,
                        help="smallest random-crop area (default 0.08 as in the paper; 0.2 for images of 96 px "
                             "or less)")
        sp.add_argument("--resume", action="store_true", help="continue from the checkpoint an interrupted run left")
        sp.add_argument("--stop-after", type=_positive_int, default=0, metavar="EPOCHS",
                        help="stop (checkpointed) after this many epochs of this invocation; continue with --resume")

    sp = sub.add_parser("knn", parents=[common], help="weighted kNN on frozen embeddings",
                        description="Weighted kNN (cosine, votes exp(sim/T)) of test embeddings among training ones.")
    sp.add_argument("-k", type=_positive_int, default=200)
    sp.add_argument("--temperature", type=float, default=0.1)

    sp = sub.add_parser("linear", parents=[common], help="linear classifier on the frozen encoder",
                        description="Linear evaluation: frozen encoder, linear classifier (SGD + Nesterov, "
                                    "cross-entropy, cosine LR) on random crop + flip views; test on centre crops.")
    sp.add_argument("--fast", action="store_true", help="train on cached centre-crop features, no augmentation")
    schedule_args(sp, 100, 0.1, 256, 0.0, "classifier")
    long_run_args(sp)

    sp = sub.add_parser("semi", parents=[common], help="fine-tune on a labelled fraction of --train",
                        description="Semi-supervised: fine-tune encoder + new head on a class-balanced subset "
                                    "(written beside the metrics), test on all of --test.")
    sp.add_argument("--fraction", type=_fraction, required=True, help="labelled fraction of every class, in (0, 1]")
    schedule_args(sp, 30, 0.05, 256, 5e-4, "fine-tuning")
    sp.add_argument("--encoder-lr-scale", type=float, default=1.0, help="the encoder's LR relative to the head's")
    long_run_args(sp)

    sp = sub.add_parser("transfer", parents=[common], help="linear + fine-tuned evaluation on another data set",
                        description="Transfer: the linear protocol and fine-tuning on another labelled data set.")
    sp.add_argument("--augment", action="store_true", help="linear part with augmentation (default: fast)")
    sp.add_argument("--linear-epochs", type=_positive_int, default=100)
    sp.add_argument("--linear-lr", type=float, default=0.1)
    schedule_args(sp, 30, 0.05, 256, 5e-4, "fine-tuning")
    sp.add_argument("--encoder-lr-scale", type=float, default=1.0, help="the encoder's LR relative to the head's")
    long_run_args(sp)
    return p


def data_tag(spec: str) -> str:
    """A short name for a data set in file names: cifar10, flowers (folder), ..."""
    path = Path(str(spec).split(":")[0])
    name = path.stem if path.suffix == ".zip" else path.name
    if name in ("train", "test", "val", "images"):
        name = path.parent.name or name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


def metrics_path(args) -> Path:
    if args.out:
        return args.out
    spec = str(args.encoder)
    random_ref = spec.startswith(sources.RANDOM_PREFIX) and Path(spec[len(sources.RANDOM_PREFIX):]).exists()
    if spec.startswith((sources.RANDOM_PREFIX, sources.SUPERVISED_PREFIX)) and not random_ref:
        raise UsageError(f"--out is required for --encoder {spec} (it has no folder to write beside)")
    ref = Path(spec[len(sources.RANDOM_PREFIX):] if random_ref else spec)
    folder = ref if ref.is_dir() else ref.parent
    name = args.protocol
    if args.protocol == "semi":
        name += f"-{args.fraction * 100:g}pct"
    if args.protocol == "transfer":
        name += f"-{args.tag or data_tag(args.train)}"
    elif args.tag:
        name += f"-{args.tag}"
    if random_ref:
        name += "-random"
    return folder / "eval" / f"{name}.json"


@dataclass
class EvaluateSettings:
    """The settings of an evaluation (written beside its metrics as <metrics>.config.json; `--set name=value`
    reaches each by name; the protocol's own flags set the defaults)."""
    protocol: str = "knn"
    encoder: str = ""
    train: str = ""
    test: str = ""
    device: str = "auto"
    precision: str = "auto"
    workers: int = 2
    seed: int = 0
    k: int = 200                           # knn
    temperature: float = 0.1
    fast: bool = False                     # linear
    augment: bool = False                  # transfer
    fraction: float = 1.0                  # semi
    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 256
    weight_decay: float = 0.0
    encoder_lr_scale: float = 1.0
    linear_epochs: int = 100               # transfer
    linear_lr: float = 0.1
    crop_scale_min: float | None = None    # None: 0.2 for images of 96 px or less, else 0.08

    @classmethod
    def from_args(cls, args) -> EvaluateSettings:
        """The flags (argparse gives every one its protocol's default), then `--set`."""
        given = {k: (str(v) if k in ("encoder", "train", "test") else v) for k, v in vars(args).items()}
        s = settings.from_dict(cls, given)
        settings.apply_overrides(s, getattr(args, "set", ()))
        if s.protocol == "semi" and not 0 < s.fraction <= 1:
            raise UsageError(f"the label fraction must be in (0, 1], got {s.fraction}")
        return s


def _decode(s: EvaluateSettings, train_sel, test_c, remap, pre: Preprocessing, progress: bool):
    """Test: the contract's centre crop; training: centre crops (kNN, fast linear) and/or the source of
    random-crop views (augmented protocols) -> (train_centre, train_views, test); None where unused."""
    augmented = s.protocol in ("semi", "transfer") or (s.protocol == "linear" and not s.fast)
    test = decode_split(test_c, pre, s.workers, progress, "decoding test images", remap)
    train_centre = train_views = None
    if s.protocol == "knn" or (s.protocol in ("linear", "transfer") and not s.augment
                               and (s.protocol == "transfer" or s.fast)):
        train_centre = decode_split(train_sel, pre, s.workers, progress, "decoding training images")
    if augmented:
        crop_pre = training_crop_source(pre)
        train_views = (train_centre if train_centre is not None and crop_pre == pre else
                       decode_split(train_sel, crop_pre, s.workers, progress, "decoding training images"))
    for split in (train_centre, train_views, test):
        if split is not None and split.skipped:
            log(None, f"skipped {split.skipped} unreadable image(s)")
    return train_centre, train_views, test


def run(args) -> dict:
    """Check everything that can be checked cheaply, then decode, then the protocol. `args`: the parsed
    command line (its settings, and --out, --resume, --stop-after, --no-progress, --tag)."""
    # ---- 1. inputs, checked before any work --------------------------------------------------
    s = EvaluateSettings.from_args(args)
    device = torch.device(resolve_device(s.device))
    precision = s.precision if s.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    encoder, info = sources.open_encoder(s.encoder, seed=s.seed)
    torch.manual_seed(s.seed)  # the new heads' initialisation
    out = metrics_path(args)
    train_c, test_c, remap = open_labelled(s.train, s.test)
    num_classes = num_classes_of(train_c)
    pre = info["preprocessing"]
    progress = not args.no_progress
    if s.crop_scale_min is None:
        s.crop_scale_min = 0.2 if pre.input_size <= 96 else 0.08
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    encoder = encoder.to(device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    config_file = out.with_name(out.stem + ".config.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.atomic_write(config_file, lambda tmp: Path(tmp).write_text(settings.dumps(s)))
    record = {"protocol": s.protocol, "encoder": s.encoder, "source": info["source"],
              "arch": info["arch"], "stem": info["stem"], "fingerprint": info["fingerprint"],
              "encoder_step": info["step"], "train": s.train, "test": s.test,
              "num_classes": num_classes, "seed": s.seed, "device": device.type, "precision": precision,
              "config_file": str(config_file)}
    train_sel = train_c
    if s.protocol == "semi":
        indices = balanced_subset(train_c.labels, s.fraction, s.seed)
        subset_file = out.with_name(out.stem + "-subset.json")
        write_subset(subset_file, train_c, indices, s.fraction, s.seed, s.train)
        train_sel = SubsetCollection(train_c, indices)
        record.update(fraction=s.fraction, subset_file=str(subset_file))
        log(None, f"labelled subset: {len(indices)} of {len(train_c)} images ({s.fraction:g} of every class) "
             f"-> {subset_file}")

    # ---- 2. decoding; 3. the protocol -----------------------------------------------------------
    train_centre, train_views, test = _decode(s, train_sel, test_c, remap, pre, progress)
    some_train = train_views if train_views is not None else train_centre
    record.update(num_train=len(some_train.images), num_test=len(test.images))
    ckpt = out.with_name(out.stem + ".ckpt.pt")
    long_kw = {"device": device, "precision": precision, "crop_scale_min": s.crop_scale_min, "seed": s.seed,
               "checkpoint": ckpt, "resume": getattr(args, "resume", False), "fingerprint": info["fingerprint"],
               "stop_after": getattr(args, "stop_after", 0), "progress": progress}

    def features():
        kw = {"precision": precision, "progress": progress}
        return (embed(encoder, train_centre.images, pre, device, desc="embedding training images", **kw),
                embed(encoder, test.images, pre, device, desc="embedding test images", **kw))

    def linear_fast(sched: Schedule) -> dict:
        tr, te = features()
        return linear_eval_features(tr, train_centre.labels.to(device), te, test.labels.to(device), num_classes,
                                    sched, s.seed, progress)

    def fit(frozen: bool, sched: Schedule, desc: str, **kw) -> dict | None:
        model = Classifier(encoder, info["embedding_dim"], num_classes, frozen=frozen)
        return train_classifier(model, train_views, test, pre, sched, desc=desc, **{**long_kw, **kw})

    if s.protocol == "knn":
        bank, queries = features()
        record.update(knn_accuracy(bank, train_centre.labels.to(device), queries, test.labels.to(device),
                                   num_classes, s.k, s.temperature), k=s.k, temperature=s.temperature)
    elif s.protocol == "linear":
        sched = Schedule(s.epochs, s.batch_size, s.lr, s.weight_decay)
        record.update(mode="fast" if s.fast else "augmented", schedule=sched.to_dict())
        metrics = linear_fast(sched) if s.fast else fit(True, sched, "linear")
        if metrics is None:
            return {"stopped": True, "checkpoint": str(ckpt)}
        record.update(metrics, **({} if s.fast else {"crop_scale_min": s.crop_scale_min}))
    else:  # semi, transfer: fine-tuning (transfer adds the linear protocol first)
        part = ckpt.with_name(out.stem + "-linear.json")
        if s.protocol == "transfer":
            lin = Schedule(s.linear_epochs, s.batch_size, s.linear_lr, 0.0)
            lin_ckpt = ckpt.with_name(out.stem + "-linear.ckpt.pt")
            record["linear"] = _transfer_linear(s, args, part, lin, lambda: linear_fast(lin),
                                                lambda: fit(True, lin, "linear", checkpoint=lin_ckpt))
            if record["linear"] is None:
                return {"stopped": True, "checkpoint": str(lin_ckpt)}
        sched = Schedule(s.epochs, s.batch_size, s.lr, s.weight_decay, encoder_lr_scale=s.encoder_lr_scale)
        metrics = fit(False, sched, "fine-tuning")
        if metrics is None:
            return {"stopped": True, "checkpoint": str(ckpt)}
        finetune = {"schedule": sched.to_dict(), "crop_scale_min": s.crop_scale_min, **metrics}
        if s.protocol == "transfer":
            record["finetune"] = finetune
            part.unlink(missing_ok=True)
        else:
            record.update(finetune)
    record.update(seconds=round(time.perf_counter() - t0, 1), byolkit_version=__version__,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), metrics_file=str(out))
    ckpt_io.atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return record


def _transfer_linear(s: EvaluateSettings, args, part: Path, lin: Schedule, fast, augmented) -> dict | None:
    """The linear part of the transfer protocol: read back when an interrupted run finished it
    (`part`), else trained (None: stopped, checkpointed) and written to `part`."""
    if getattr(args, "resume", False) and part.is_file():  # the linear part finished before the interruption
        try:
            return json.loads(part.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot resume from {part}: not readable JSON ({e}); delete it or drop "
                             "--resume") from None
    if s.augment:
        metrics = augmented()
        if metrics is None:
            return None
        linear = {"mode": "augmented", "schedule": lin.to_dict(), **metrics}
    else:
        linear = {"mode": "fast", "schedule": lin.to_dict(), **fast()}
    ckpt_io.atomic_write(part, lambda tmp: Path(tmp).write_text(json.dumps(linear)))
    return linear


def summary_line(r: dict) -> str:
    what = f"{r['protocol']}"
    if r["protocol"] == "semi":
        what += f" {r['fraction']:g}"
    if r["protocol"] == "transfer":
        scores = (f"linear top-1 {r['linear']['top1']:.2%} top-5 {r['linear']['top5']:.2%}, "
                  f"fine-tuned top-1 {r['finetune']['top1']:.2%} top-5 {r['finetune']['top5']:.2%}")
    else:
        scores = f"top-1 {r['top1']:.2%} top-5 {r['top5']:.2%}"
        if r.get("mode"):
            what += f" ({r['mode']})"
    return (f"{what}: {scores} | {r['arch']} {r['source']} {r['fingerprint']}, {r['num_train']} train / "
            f"{r['num_test']} test, {r['seconds']:.0f}s -> {r['metrics_file']}")


@cli_main
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    record = run(args)
    if record.get("stopped"):
        print(f"stopped after --stop-after {args.stop_after} epoch(s); continue with --resume "
              f"(checkpoint {record['checkpoint']})")
        return 0
    print(summary_line(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
