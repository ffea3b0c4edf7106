"""What detection, segmentation and depth fine-tuning share: the ResNet backbone built from an
encoder source (norm layers, trainable stages, strides turned into dilations), the deterministic
epoch order and per-sample randomness that make a resume exact, the run checkpoint, atomic JSON,
and drawing predictions (boxes with readable labels, side-by-side panels, a legend, a colour scale
bar). Schedules are in trainer.optim, errors, devices and the resume rule in trainer.runtime.

Kept small on purpose: each task's module (trainer.finetune.detect, .segment, .depth) owns its
data, model head, metrics and loop, in the style of torchvision's references.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from .. import checkpoint as ckpt_io
from .. import settings
from ..distributed import all_reduce
from ..runtime import UsageError
from ..settings import add_set_flag

NORM_CHOICES = ("frozen", "sync", "bn")
# torchvision's convention for --trainable-layers: the last N of these are trained, the rest frozen
STAGES = ("layer4", "layer3", "layer2", "layer1", "conv1")


# ============================================================================================
# The backbone
# ============================================================================================
def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d becomes a FrozenBatchNorm2d holding the same statistics and affine terms."""
    from torchvision.ops import FrozenBatchNorm2d
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def dilate_resnet(net: nn.Module, replace_stride_with_dilation=(False, True, True)) -> nn.Module:
    """Turn the strides of layer2-4 into dilations as torchvision's ResNet(replace_stride_with_dilation=...)
    builds them, on an already-built network, in place; the weights are untouched.

    torchvision's BasicBlock refuses dilation at construction, so ResNet-18/34 (and the narrow ones)
    cannot be built dilated; converting afterwards works for both block types. As in torchvision, the
    first block of a dilated stage keeps the previous dilation (with stride 1) and the others get the
    new one; in a BasicBlock both 3x3 convolutions take the block's dilation.
    """
    dilation = 1
    for name, dilate in zip(("layer2", "layer3", "layer4"), replace_stride_with_dilation):
        layer = getattr(net, name)
        if not dilate:
            continue
        previous, dilation = dilation, dilation * 2
        for i, block in enumerate(layer):
            d = previous if i == 0 else dilation
            for module in block.modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
                    module.stride, module.dilation, module.padding = (1, 1), (d, d), (d, d)
                elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                    module.stride = (1, 1)  # the downsample shortcut
    return net


def stage_channels(resnet: nn.Module) -> list[int]:
    """Output channels of layer1..layer4 (narrow ResNets included): the last convolution of each stage."""
    out = []
    for i in range(1, 5):
        convs = [m for m in getattr(resnet, f"layer{i}")[-1].modules() if isinstance(m, nn.Conv2d)]
        out.append(convs[-1].out_channels)
    return out


def prepare_resnet(resnet: nn.Module, trainable_layers: int, norm: str) -> nn.Module:
    """Apply the norm mode and freeze all but the last `trainable_layers` stages (0-5, torchvision's rule).

    norm: "frozen" (statistics and affine terms fixed, the usual choice for a pretrained backbone
    with small per-device batches), "bn" (ordinary BatchNorm, trained), "sync" (BatchNorm
    synchronised over torchrun processes; converted by `wrap_distributed`).
    """
    if not 0 <= trainable_layers <= 5:
        raise UsageError(f"--trainable-layers must be 0-5, got {trainable_layers}")
    if norm not in NORM_CHOICES:
        raise UsageError(f"--norm must be one of {', '.join(NORM_CHOICES)}, got {norm!r}")
    if norm == "frozen":
        freeze_batchnorm(resnet)
    train = set(STAGES[:trainable_layers])
    if "conv1" in train:
        train.add("bn1")
    for name, p in resnet.named_parameters():
        p.requires_grad_(name.split(".")[0] in train)
    return resnet


def resnet_fpn(resnet: nn.Module, out_channels: int = 0):
    """torchvision's BackboneWithFPN over layer1..layer4 of a byolkit encoder (P2-P5 plus a max-pooled P6).

    out_channels 0: 256, or the last stage's width when that is narrower (narrow ResNet-18s).
    """
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    in_channels = stage_channels(resnet)
    out_channels = out_channels or min(256, in_channels[-1])
    return BackboneWithFPN(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}, in_channels, out_channels)


def wrap_distributed(model: nn.Module, norm: str, dist, device: torch.device) -> nn.Module:
    """DDP under torchrun, with SyncBatchNorm when asked (CUDA only: torch has no CPU SyncBN)."""
    if not dist.enabled:
        return model
    if norm == "sync":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model.to(device),
                                               device_ids=[device.index] if device.type == "cuda" else None)


def check_norm_for_device(norm: str, dist, device_type: str) -> None:
    if norm == "sync" and dist.enabled and device_type != "cuda":
        raise UsageError("--norm sync needs CUDA processes (torch has no CPU SyncBatchNorm); use bn or frozen")


def default_trainable_layers(source_kind: str) -> int:
    """3 stages for a pretrained backbone (torchvision's default); all 5 for a random one."""
    return 5 if source_kind == "random" else 3


def default_norm(source_kind: str) -> str:
    """Frozen statistics for a pretrained backbone; a random one has no statistics worth freezing."""
    return "bn" if source_kind == "random" else "frozen"


# ============================================================================================
# Epoch order, resume
# ============================================================================================
def epoch_indices(sampler, epoch: int, start: int = 0) -> list[int]:
    """This process's sample order for `epoch` (a DistributedSampler's), from position `start`:
    a resumed run continues inside the epoch at the batch where it stopped."""
    sampler.set_epoch(epoch)
    return list(sampler)[start:]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The augmentation randomness of one sample in one epoch: independent of workers, processes and
    of where a run was resumed, so that a resumed run repeats the uninterrupted one exactly."""
    return np.random.default_rng([seed, epoch, index])


def finetune_main(argv, parser, kind: str, resolve_settings, train) -> int:
    """The command line of a dense task: open (or resume) the run in --out, resolve its settings, train,
    print the one-line JSON summary (main process). Wrapped in runtime.cli_main by each task."""
    from ..runtime import open_run
    args = parser.parse_args(argv)
    out = Path(args.out)
    state = open_run(out, args.resume, kind=kind)
    summary = train(resolve_settings(args, state["config"] if state else None), out, state,
                    progress=not args.no_progress)
    if summary is not None:
        print(json.dumps(summary))
    return 0


def save_run(out: Path, *, model, optimizer, epoch: int, position: int, step: int, config,
             history: list, extra: dict | None = None) -> None:
    """The fine-tuning checkpoint: weights, optimiser, where in which epoch, the run's settings."""
    config = settings.to_dict(config) if dataclasses.is_dataclass(config) else config
    ckpt_io.save_checkpoint(out, model=model, optimizer=optimizer, step=step, config=config,
                            extra={"epoch": epoch, "position": position, "history": history, **(extra or {})})


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """This process's batches of epoch `epoch`: a function of (seed, epoch) only, so a resumed run
    sees exactly the order the uninterrupted one would have (DistributedSampler's sharding)."""
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    return math.ceil(math.ceil(n / world) / batch_size)


def write_json(path: Path, obj) -> None:
    ckpt_io.atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def start_processes(s):
    """Processes, device and seeds of a segmentation or depth run -> (dist, device type); the batch
    must split evenly over the processes, at least 2 images each (BatchNorm)."""
    from ..distributed import init_distributed
    from ..runtime import resolve_device
    device_type = resolve_device(s.device)
    dist = init_distributed(device_type)
    if s.batch_size % dist.world or s.batch_size // dist.world < 2:
        raise UsageError(f"--batch-size {s.batch_size} must split evenly over {dist.world} process(es), "
                         "at least 2 images each (BatchNorm)")
    torch.manual_seed(s.seed)  # the head starts the same in every process
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dist, device_type


def displayed_size(path: Path) -> tuple[int, int]:
    """(width, height) of a photo as load_rgb returns it: EXIF rotations by 90 degrees swap the sides."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"not a readable image: {path} ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


@dataclass
class RunSettings:
    """What every fine-tuning run has: the encoder, the schedule's size, where it runs, what it draws.
    Each task's dataclass adds its own settings and may restate a default here."""
    encoder: str | None = None
    epochs: int = 1
    batch_size: int = 8
    lr: float = 0.01
    weight_decay: float = 1e-4
    device: str = "auto"
    workers: int = 2
    seed: int = 0
    draw: int = 4
    eval_every: int = 1


@dataclass
class DenseSettings(RunSettings):
    """The settings segmentation and depth runs share; a resume may change only CHANGEABLE_ON_RESUME."""
    CHANGEABLE_ON_RESUME: ClassVar[tuple] = ("epochs", "workers", "device", "eval_every", "draw")
    task: str = ""
    base_size: int = 240
    backbone: dict | None = None          # the encoder's description, filled in when the run starts

    def check_ranges(self, positive=("lr",), **lowest) -> None:
        """Usage errors for settings below their lowest value (`lowest` adds the task's own) or not positive."""
        lows = {"epochs": 1, "batch_size": 2, "base_size": 16, "workers": 0, "draw": 0, "eval_every": 0, **lowest}
        for key, low in lows.items():
            if getattr(self, key) < low:
                raise UsageError(f"--{key.replace('_', '-')} must be at least {low}")
        for key in positive:
            if not getattr(self, key) > 0:
                raise UsageError(f"--{key.replace('_', '-')} must be positive")


def add_run_flags(p, d: DenseSettings, draw_help: str, resume_help: str) -> None:
    """The flags a segmentation or depth command line ends with (`d`: the task's defaults): when to
    evaluate, what to draw, where and how to run, --set, --resume (`resume_help`) and progress."""
    p.add_argument("--eval-every", type=int, help=f"evaluate every N epochs, 0 = after the last only "
                   f"(default {d.eval_every})")
    p.add_argument("--draw", type=int, help=f"{draw_help} (default {d.draw})")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(default auto)")
    p.add_argument("--workers", type=int, help=f"data-loading processes per process (default {d.workers})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    add_set_flag(p)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@dataclass
class RunState:
    """Where a fine-tuning run is: the epoch, the samples of this process's epoch order already trained,
    the optimiser step, the per-epoch history, unreadable samples skipped so far."""
    epoch: int = 0
    position: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    skipped: int = 0

    @classmethod
    def start(cls, out: Path, cfg, state: dict | None, model: nn.Module, optimizer, per_process: int,
              steps_per_epoch: int, dist) -> RunState:
        """A new run, or the resumed one (its weights, optimiser and RNGs restored); the run directory
        made, with the run's config.json, before any process goes on."""
        from ..distributed import barrier
        from ..runtime import log
        at = cls()
        if state is not None:
            at = cls.restore(state, model, optimizer, per_process, steps_per_epoch)
            log(dist, f"resumed {out} at epoch {at.epoch + 1}, batch {at.position // per_process + 1}")
        if dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            settings.write_config(out, cfg)
        barrier(dist)
        return at

    @classmethod
    def restore(cls, state: dict, model: nn.Module, optimizer, per_process: int, steps_per_epoch: int,
                skipped_key: str = "skipped_unreadable") -> RunState:
        """Load a checkpoint written by save_run into `model` and `optimizer` (and the RNGs)."""
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt_io.set_rng_state(state["rng"])
        epoch, position = int(state["epoch"]), int(state["position"])
        return cls(epoch, position, epoch * steps_per_epoch + position // per_process, list(state["history"]),
                   int(state.get(skipped_key, 0)))


class EpochLoop:
    """The training loop segmentation and depth share, in epochs of a DistributedSampler's order that a
    resume re-enters at the batch where it stopped: per step the LR from `lr_at`, `loss_of(batch)`
    (-> (loss, unreadable samples)), backward, SGD/AdamW step; SIGINT/SIGTERM checkpoint the batch and
    stop; after each epoch `end_epoch(record, last)` evaluates, keeps the history and saves.
    """

    def __init__(self, *, model: nn.Module, optimizer, train_set, sampler, lr_at: list, per_process: int,
                 epochs: int, workers: int, seed: int, dist, device, desc: str, show: bool, collate_fn=None):
        self.model, self.optimizer, self.train_set, self.sampler = model, optimizer, train_set, sampler
        self.lr_at, self.per_process, self.epochs, self.workers, self.seed = lr_at, per_process, epochs, workers, seed
        self.dist, self.device, self.desc, self.show, self.collate_fn = dist, device, desc, show, collate_fn

    def _loader(self, epoch: int, position: int):
        # the loader's own generator: creating it must not draw from the global RNG (dropout's), or a
        # run resumed mid-epoch would drift from the uninterrupted one
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.per_process,
                                           sampler=epoch_indices(self.sampler, epoch, position), drop_last=True,
                                           num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                           collate_fn=self.collate_fn,
                                           generator=torch.Generator().manual_seed(self.seed + epoch))

    def run(self, at: RunState, loss_of, end_epoch, save) -> bool:
        """Train from `at` to the last epoch; returns True when stopped by a signal (checkpointed)."""
        from ..runtime import Stop, log, progress_bar
        total = self.epochs * (len(self.sampler) // self.per_process)
        trained_before = at.history[-1]["train_seconds"] if at.history else 0.0  # resumed: time already spent
        t_start, eval_seconds = time.perf_counter(), 0.0
        self.model.train()
        with Stop() as stop:
            bar = progress_bar(total, at.step, self.show, desc=self.desc)
            while at.epoch < self.epochs and not stop.requested:
                self.train_set.epoch = at.epoch
                loader = self._loader(at.epoch, at.position)
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, batches, unreadable
                for batches, batch in enumerate(loader, 1):
                    for g in self.optimizer.param_groups:
                        g["lr"] = self.lr_at[at.step]
                    loss, unreadable = loss_of(batch)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    sums[0] += loss.detach()
                    sums[1] += 1
                    sums[2] += unreadable
                    at.step, at.position = at.step + 1, at.position + self.per_process
                    bar.update(1)
                    if at.step % 5 == 0 or batches == len(loader):
                        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.lr_at[at.step - 1]:.3g}",
                                        epoch=at.epoch + 1)
                    if stop.requested:
                        break
                sums = all_reduce(sums, self.dist)
                at.skipped += int(sums[2].item())
                if stop.requested:
                    save(at.epoch, at.position)
                    log(self.dist, f"\nstopped in epoch {at.epoch + 1} at step {at.step}; checkpoint written, "
                                   "continue with --resume")
                    break
                at.epoch, at.position = at.epoch + 1, 0
                record = {"epoch": at.epoch, "step": at.step, "lr": self.lr_at[at.step - 1],
                          "train_loss": sums[0].item() / max(sums[1].item(), 1),
                          "train_seconds": trained_before + time.perf_counter() - t_start - eval_seconds}
                end_epoch(record, at.epoch == self.epochs)
                eval_seconds += record.get("eval_seconds", 0.0)
            bar.close()
        return stop.requested


# ============================================================================================
# Drawing
# ============================================================================================
def palette(n: int) -> list[tuple[int, int, int]]:
    """n well-separated colours (golden-angle hues, alternating brightness), the same for every call."""
    import colorsys
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, (0.95, 0.7)[i % 2]))
            for i in range(n)]


GROUND_TRUTH_COLOUR = (255, 255, 255)  # ground-truth boxes: white, drawn under the predictions


def _font(size: int):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def draw_predictions(image: torch.Tensor, path: Path, boxes=None, labels: list[str] | None = None,
                     colours=None, masks=None, ground_truth=None) -> Path:
    """uint8 [3, H, W] photo + predicted boxes (xyxy) with captions and/or boolean masks [N, H, W],
    and optionally ground-truth boxes (drawn thin, white, unlabelled) -> a JPEG.

    Captions sit on a filled box of the prediction's colour in black or white, whichever reads
    better, inside the picture (above the box when there is room, else inside its top edge)."""
    from PIL import ImageDraw
    from torchvision.utils import draw_segmentation_masks
    out = image
    if masks is not None and len(masks):
        out = draw_segmentation_masks(out, masks.bool(), alpha=0.45, colors=colours)
    canvas = Image.fromarray(out.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(canvas.size) / 160))
    for b in ([] if ground_truth is None else ground_truth.tolist()):
        draw.rectangle(b, outline=GROUND_TRUTH_COLOUR, width=width)
    boxes = [] if boxes is None else boxes.tolist()
    colours = colours or palette(len(boxes))
    for b, colour in zip(boxes, colours):
        draw.rectangle(b, outline=tuple(colour), width=width + 1)
    font = _font(max(10, min(canvas.size) // 40))
    for b, colour, text in zip(boxes, colours, labels or []):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 4, bottom - top + 4
        x = min(max(0, b[0]), max(0, canvas.width - w))
        y = b[1] - h if b[1] - h >= 0 else min(b[1], canvas.height - h)
        draw.rectangle((x, y, x + w, y + h), fill=tuple(colour))
        ink = "black" if sum(c * k for c, k in zip(colour, (0.299, 0.587, 0.114))) > 140 else "white"
        draw.text((x + 2 - left, y + 2 - top), text, fill=ink, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt_io.atomic_write(path, lambda tmp: canvas.save(tmp, format="JPEG", quality=90))
    return path


def side_by_side(*panels: torch.Tensor, gap: int = 8) -> Image.Image:
    """uint8 [3, H, W] tensors of the same height -> one PIL image, left to right, white gaps."""
    h = panels[0].shape[1]
    spacer = torch.full((3, h, gap), 255, dtype=torch.uint8)
    parts = []
    for i, p in enumerate(panels):
        parts += ([spacer] if i else []) + [p]
    return Image.fromarray(torch.cat(parts, dim=2).permute(1, 2, 0).numpy())


def add_legend(image: Image.Image, entries: list[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """A white strip under the image naming each colour: a swatch and the class name, wrapped in rows."""
    from PIL import ImageDraw
    if not entries:
        return image
    font = _font(max(11, image.width // 70))
    probe = ImageDraw.Draw(image)
    line = int(font.size * 1.6)
    x, y, placed = 6, 6, []
    for name, colour in entries:
        width = line + int(probe.textlength(name, font=font)) + 14
        if x + width > image.width and x > 6:
            x, y = 6, y + line
        placed.append((x, y, name, colour))
        x += width
    canvas = Image.new("RGB", (image.width, image.height + y + line + 6), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for x, y, name, colour in placed:
        top = image.height + y
        draw.rectangle((x, top + 2, x + line - 6, top + line - 4), fill=colour)
        draw.text((x + line, top + 1), name, fill="black", font=font)
    return canvas


# perceptually ordered anchors of matplotlib's "magma" (dark = near, bright = far is the usual reading)
_MAGMA = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                   (250, 193, 39), (252, 253, 191)], dtype=np.float64)


def colour_map(values: np.ndarray, low: float, high: float, invalid=None) -> np.ndarray:
    """float [H, W] -> uint8 [H, W, 3] on a magma-like scale from `low` to `high` (clipped);
    pixels where `invalid` is True are drawn mid-grey."""
    t = np.clip((np.nan_to_num(values, nan=low) - low) / max(high - low, 1e-12), 0, 1) * (len(_MAGMA) - 1)
    i = np.minimum(t.astype(np.int64), len(_MAGMA) - 2)
    f = (t - i)[..., None]
    rgb = (_MAGMA[i] * (1 - f) + _MAGMA[i + 1] * f).round().astype(np.uint8)
    if invalid is not None:
        rgb[invalid] = 128
    return rgb


def add_scale_bar(image: Image.Image, low: float, high: float, unit: str = "m", ticks: int = 5) -> Image.Image:
    """A white strip under the image with the colour_map gradient from `low` to `high` and labelled ticks."""
    from PIL import ImageDraw
    font = _font(max(11, image.width // 70))
    bar_h, margin = max(10, font.size), 10
    text_h = int(font.size * 1.4)
    canvas = Image.new("RGB", (image.width, image.height + bar_h + text_h + 2 * margin), "white")
    canvas.paste(image, (0, 0))
    left, right = margin, image.width - margin - int(font.size * 2.5)
    gradient = colour_map(np.tile(np.linspace(low, high, max(right - left, 2)), (bar_h, 1)), low, high)
    top = image.height + margin
    canvas.paste(Image.fromarray(gradient), (left, top))
    draw = ImageDraw.Draw(canvas)
    widest = max(draw.textlength(f"{v:.2f}", font=font) for v in (low, high))
    ticks = max(2, min(ticks, int((right - left) // (widest * 1.4)) + 1))  # labels never overlap
    for k in range(ticks):
        x = left + round(k * (right - left - 1) / (ticks - 1))
        value = low + k * (high - low) / (ticks - 1)
        text = f"{value:.2f}" if high - low < 5 else f"{value:.1f}"
        draw.line((x, top + bar_h, x, top + bar_h + 3), fill="black")
        w = draw.textlength(text, font=font)
        draw.text((min(max(0, x - w / 2), canvas.width - w), top + bar_h + 4), text, fill="black", font=font)
    draw.text((right + 6, top + (bar_h - font.size) // 2), unit, fill="black", font=font)
    return canvas
