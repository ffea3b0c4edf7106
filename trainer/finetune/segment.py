"""Semantic segmentation on a BYOL encoder: a torchvision FCN or DeepLabV3 head, fine-tuned end to end.

    python -m trainer.segment --encoder runs/quick --classes data/classes.json \\
        --train-images data/images/train --train-masks data/masks/train \\
        --val-images data/images/val --val-masks data/masks/val --out runs/seg
    torchrun --nproc_per_node 4 -m trainer.segment ...   # DDP, SyncBatchNorm on GPUs
    python -m trainer.segment --out runs/seg --resume     # a killed run continues where it stopped

Data: photos, and for each a single-channel PNG mask with the same file stem whose pixels are class
ids from the classes file (a JSON {"ignore_index": 0, "classes": {"1": "person", ...}} or a JSON
list of names, ids = positions); pixels equal to the ignore index count for nothing. Photos without
a mask are skipped and counted. Everything is checked before training starts.

The encoder is made dilated as torchvision does for segmentation (the strides of layer3 and layer4
become dilations: output stride 8 with the ImageNet stem, 2 with the small stem) and keeps its
weights. Training follows torchvision's segmentation reference: random resize of the shorter side
to 0.5-2x --base-size, random crop, horizontal flip, SGD with momentum and a poly learning rate
decayed per step. Evaluation resizes the photo's shorter side to --base-size, upsamples the logits
to the mask's own size and accumulates a confusion matrix there.

Metrics: pixel accuracy = correct / labelled pixels; IoU(c) = TP / (TP + FP + FN); mean IoU is the
mean over the classes that occur in the validation ground truth or predictions (a class absent from
both has no defined IoU and is left out, reported as null).

RUN/ receives checkpoint.pt (atomic, every epoch and when stopped by SIGINT/SIGTERM: --resume is
exact), metrics.json (atomic, after every evaluation), predictions/*.jpg (prediction | ground
truth, coloured masks over the photo) and a one-line JSON summary on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from contract.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, Preprocessing, load_rgb, resize_shorter_side

from .. import checkpoint as ckpt_io
from .. import settings
from ..distributed import Dist, all_gather_objects, all_reduce, barrier, shutdown
from ..optim import poly_schedule
from ..runtime import UsageError, cli_main, log
from ..sources import ENCODER_SOURCE_HELP, open_encoder
from .common import (
    DenseSettings,
    EpochLoop,
    RunState,
    add_legend,
    add_run_flags,
    dilate_resnet,
    displayed_size,
    finetune_main,
    palette,
    sample_rng,
    save_run,
    side_by_side,
    start_processes,
    write_json,
)


# ============================================================================================
# The backbone, checkpoint/resume skeleton and drawing of this task (the parts shared with
# detection live in trainer.finetune.common)
# ============================================================================================
def backbone_info(info: dict) -> dict:
    """What a run must remember to rebuild its backbone without the encoder source (JSON-able)."""
    return {"arch": info["arch"], "stem": info["stem"], "embedding_dim": int(info["embedding_dim"]),
            "preprocessing": info["preprocessing"].to_dict(), "fingerprint": info["fingerprint"],
            "source": info.get("source", "byol"), "step": int(info.get("step", 0))}


def open_backbone(spec: str | None, seed: int, saved: dict | None = None, dilate=(False, True, True)):
    """An encoder source (or a resumed run's saved backbone_info) -> (dilated ResNet, backbone_info)."""
    from ..models import build_encoder
    if saved is not None:  # resume: the weights come from the checkpoint
        encoder, _ = build_encoder(saved["arch"], saved["stem"])
        info = saved
    else:
        encoder, raw = open_encoder(spec, seed)
        info = backbone_info(raw)
    return dilate_resnet(encoder, dilate), info


# ============================================================================================
# Classes and data
# ============================================================================================
IGNORE = -1  # the ignore label inside training (class ids are mapped to 0..C-1)


class Classes:
    """The classes file: dataset class ids (possibly sparse, e.g. COCO panoptic) -> training indices."""

    def __init__(self, ids: list[int], names: list[str], ignore_index: int | None):
        self.ids, self.names, self.ignore_index = ids, names, ignore_index
        size = max([*ids, ignore_index if ignore_index is not None else 0]) + 2  # the last entry: unknown
        self.lut = np.full(max(size, 257), -2, dtype=np.int64)  # -2: not a known id
        self.lut[ids] = np.arange(len(ids))
        if ignore_index is not None:
            self.lut[ignore_index] = IGNORE

    def __len__(self):
        return len(self.ids)

    @classmethod
    def load(cls, path: str | Path, ignore_index: int | None = None) -> Classes:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise UsageError(f"cannot read the classes file {path}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"the classes file {path} is not valid JSON ({e})") from None
        file_ignore = None
        if isinstance(raw, dict):
            file_ignore, table = raw.get("ignore_index"), raw.get("classes")
            if isinstance(table, list):
                table = dict(enumerate(table))
            if not isinstance(table, dict):
                raise UsageError(f"{path}: expected {{\"classes\": {{id: name, ...}}, \"ignore_index\": N}} "
                                 "or a list of names")
        elif isinstance(raw, list):
            table = dict(enumerate(raw))
        else:
            raise UsageError(f"{path}: expected a JSON object or a list of class names")
        try:
            pairs = sorted((int(k), str(v)) for k, v in table.items())
        except ValueError:
            raise UsageError(f"{path}: class ids must be integers") from None
        ignore = ignore_index if ignore_index is not None else (int(file_ignore) if file_ignore is not None else None)
        if any(i < 0 or i > 65535 for i, _ in pairs) or (ignore is not None and not 0 <= ignore <= 65535):
            raise UsageError(f"{path}: class ids and the ignore index must be within 0-65535")
        pairs = [(i, n) for i, n in pairs if i != ignore]  # e.g. "0": "unlabeled" when 0 is ignored
        if len(pairs) < 2:
            raise UsageError(f"{path} names {len(pairs)} class(es) besides the ignore index; need at least 2")
        return cls([i for i, _ in pairs], [n for _, n in pairs], ignore)

    def to_dict(self) -> dict:
        return {"ids": self.ids, "names": self.names, "ignore_index": self.ignore_index}

    @classmethod
    def from_dict(cls, d: dict) -> Classes:
        return cls(list(d["ids"]), list(d["names"]), d["ignore_index"])

    def map(self, raw: np.ndarray) -> np.ndarray:
        """Mask of class ids -> training indices (IGNORE for the ignore index), int64."""
        return self.lut[np.minimum(raw, len(self.lut) - 1)]


def read_mask(path: Path) -> np.ndarray:
    """A single-channel PNG -> integer array [H, W] of class ids (8- or 16-bit; palette PNGs by index)."""
    try:
        with Image.open(path) as m:
            if m.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise UsageError(f"mask {path} is a {m.mode} image; masks must be single-channel "
                                 "(grey-level or palette PNG of class ids)")
            return np.asarray(m).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"mask {path} is not a readable image ({type(e).__name__}: {e})") from None


def scan_pairs(images: str | Path, masks: str | Path, classes: Classes, split: str,
               progress: bool = False) -> tuple[list[tuple[Path, Path]], int]:
    """Pair every mask with its photo and check them all before any training.

    Returns ([(photo, mask), ...] sorted by name, number of photos without a mask). Raises UsageError
    for: a missing folder, a mask naming a missing photo, a mask whose size differs from its photo,
    class ids the classes file lacks, or no pairs at all.
    """
    images, masks = Path(images), Path(masks)
    for flag, folder in ((f"--{split}-images", images), (f"--{split}-masks", masks)):
        if not folder.is_dir():
            raise UsageError(f"{flag} {folder} is not a folder")
    photos = {}
    for p in sorted(images.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            photos.setdefault(p.stem, p)
    mask_files = sorted(p for p in masks.iterdir() if p.is_file() and p.suffix.lower() == ".png"
                        and not p.name.startswith("."))
    if not mask_files:
        raise UsageError(f"no masks (.png) in {masks}")
    orphans = [m.name for m in mask_files if m.stem not in photos]
    if orphans:
        raise UsageError(f"{len(orphans)} mask(s) in {masks} name no photo in {images}: "
                         f"{', '.join(orphans[:5])}{' ...' if len(orphans) > 5 else ''}")
    from tqdm import tqdm
    pairs, bad_size, bad_ids = [], [], []
    for m in tqdm(mask_files, desc=f"checking {split} masks", unit="mask", disable=not progress, leave=False):
        photo = photos[m.stem]
        raw = read_mask(m)
        size = displayed_size(photo)
        if (raw.shape[1], raw.shape[0]) != size:
            bad_size.append(f"{m.name} is {raw.shape[1]}x{raw.shape[0]}, {photo.name} is {size[0]}x{size[1]}")
        unknown = sorted(set(np.unique(raw).tolist()) - set(classes.ids) - {classes.ignore_index})
        if unknown:
            bad_ids.append(f"{m.name}: {unknown[:8]}")
        pairs.append((photo, m))
    if bad_size:
        raise UsageError(f"{len(bad_size)} mask(s) differ in size from their photo: {'; '.join(bad_size[:3])}")
    if bad_ids:
        raise UsageError(f"{len(bad_ids)} mask(s) in {masks} hold class ids that the classes file does not "
                         f"name (ignore index: {classes.ignore_index}): {'; '.join(bad_ids[:3])}")
    return pairs, len(photos) - len(pairs)


class TrainSet(torch.utils.data.Dataset):
    """Random resize (shorter side 0.5-2x base), pad, random crop, flip; the mask follows (nearest).
    Returns (uint8 [3, crop, crop], int64 [crop, crop] training indices)."""

    def __init__(self, pairs, classes: Classes, base_size: int, crop_size: int, seed: int):
        self.pairs, self.classes, self.base, self.crop, self.seed = pairs, classes, base_size, crop_size, seed
        self.epoch = 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        photo_path, mask_path = self.pairs[index]
        rng = sample_rng(self.seed, self.epoch, index)
        photo = load_rgb(photo_path)
        mask = Image.fromarray(read_mask(mask_path).astype(np.int32))  # mode "I": any id survives resizing
        short = int(rng.integers(int(0.5 * self.base), int(2.0 * self.base) + 1))
        w, h = photo.size
        scale = short / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        photo = np.asarray(photo.resize(size, Image.BILINEAR))
        target = self.classes.map(np.asarray(mask.resize(size, Image.NEAREST)))
        # pad to the crop size (black photo, ignored mask), then crop
        ph, pw = max(self.crop - size[1], 0), max(self.crop - size[0], 0)
        if ph or pw:
            photo = np.pad(photo, ((0, ph), (0, pw), (0, 0)))
            target = np.pad(target, ((0, ph), (0, pw)), constant_values=IGNORE)
        top = int(rng.integers(0, photo.shape[0] - self.crop + 1))
        left = int(rng.integers(0, photo.shape[1] - self.crop + 1))
        photo = photo[top:top + self.crop, left:left + self.crop]
        target = target[top:top + self.crop, left:left + self.crop]
        if rng.random() < 0.5:
            photo, target = photo[:, ::-1], target[:, ::-1]
        return (torch.from_numpy(np.ascontiguousarray(photo)).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(target)))


class EvalSet(torch.utils.data.Dataset):
    """The photo with its shorter side at base size, and the full-resolution mask (training indices)."""

    def __init__(self, pairs, classes: Classes, base_size: int):
        self.pairs, self.classes, self.base = pairs, classes, base_size

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        photo_path, mask_path = self.pairs[index]
        photo = load_rgb(photo_path)
        photo = resize_shorter_side(photo, self.base)  # the contract's resize step, at --base-size
        target = self.classes.map(read_mask(mask_path))
        return torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1), torch.from_numpy(target), index


# ============================================================================================
# Model and metrics
# ============================================================================================
HEADS = ("deeplabv3", "fcn")


def build_model(backbone: nn.Module, info: dict, head: str, num_classes: int) -> nn.Module:
    """torchvision's DeepLabV3 or FCN around the (dilated) encoder's layer4; output = input size."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead
    features = IntermediateLayerGetter(backbone, return_layers={"layer4": "out"})
    channels = info["embedding_dim"]  # layer4's output is the embedding
    if head == "deeplabv3":
        return DeepLabV3(features, DeepLabHead(channels, num_classes))
    return FCN(features, FCNHead(channels, num_classes))


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, rows = ground truth, columns = prediction; ignored pixels (< 0) left out."""
    valid = target >= 0
    idx = target[valid] * num_classes + pred[valid]
    return torch.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_scores(confusion: torch.Tensor, names: list[str]) -> dict:
    """Pixel accuracy, per-class IoU and mean IoU (over classes present in ground truth or prediction)."""
    c = confusion.double()
    tp, gt, pred = c.diag(), c.sum(1), c.sum(0)
    union = gt + pred - tp
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = c.sum().item()
    return {"pixel_accuracy": (tp.sum().item() / total) if total else float("nan"),
            "mean_iou": iou[present].mean().item() if present.any() else float("nan"),
            "classes_scored": int(present.sum()),
            "labelled_pixels": int(total),
            "iou": {n: (None if math.isnan(v) else round(v, 6)) for n, v in zip(names, iou.tolist())}}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: EvalSet, pre: Preprocessing, num_classes: int, device, dist: Dist,
             keep: int = 0, workers: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Confusion matrix over this process's share of the images, summed over processes; and the
    predictions (class indices at mask size) of the first `keep` images, for drawing."""
    from tqdm import tqdm
    model.eval()
    # counted on the device: no host synchronisation per image (only the drawn ones come back)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    kept = {}
    share = torch.utils.data.Subset(dataset, range(dist.rank, len(dataset), dist.world))  # each image once
    loader = torch.utils.data.DataLoader(share, batch_size=None, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    for photo, target, index in tqdm(loader, desc="evaluating", unit="img", disable=not progress, leave=False):
        x = pre.normalize_tensor(photo[None].to(device, non_blocking=True))
        target = target.to(device, non_blocking=True)
        logits = model(x)["out"]
        logits = F.interpolate(logits, size=target.shape, mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0]
        confusion += confusion_matrix(target, pred, num_classes)
        if int(index) < keep:
            kept[int(index)] = pred.cpu()
    confusion = all_reduce(confusion, dist).cpu()  # the process's device: NCCL refuses CPU tensors
    model.train()
    return confusion, kept


def draw_predictions(out_dir: Path, dataset: EvalSet, predictions: dict, classes: Classes, alpha: float = 0.55):
    """predictions/<stem>.jpg: predicted mask | ground truth, coloured over the photo, with a legend."""
    from torchvision.utils import draw_segmentation_masks
    out_dir.mkdir(parents=True, exist_ok=True)

    def overlay(photo, labels, colours):
        present = [c for c in labels.unique().tolist() if c >= 0]
        if not present:
            return photo
        masks = torch.stack([labels == c for c in present])
        return draw_segmentation_masks(photo, masks, alpha=alpha, colors=[colours[c] for c in present])

    written = []
    for index, pred in sorted(predictions.items()):
        photo_path, mask_path = dataset.pairs[index]
        photo = torch.from_numpy(np.asarray(load_rgb(photo_path)).copy()).permute(2, 0, 1)
        target = torch.from_numpy(classes.map(read_mask(mask_path)))
        # colours spread over the classes in this picture only: with 100+ classes a global palette
        # would give neighbouring regions near-identical hues
        present = sorted(set(pred.unique().tolist()) | {c for c in target.unique().tolist() if c >= 0})
        colours = dict(zip(present, palette(len(present))))
        image = side_by_side(overlay(photo, pred, colours), overlay(photo, target, colours))
        image = add_legend(image, [(classes.names[c], colours[c]) for c in present])
        path = out_dir / f"{photo_path.stem}.jpg"
        ckpt_io.atomic_write(path, lambda tmp, image=image: image.save(tmp, "JPEG", quality=88))
        written.append(path)
    return written


# ============================================================================================
# Training
# ============================================================================================
def train(cfg: SegmentSettings, out: Path, state: dict | None = None, progress: bool = True) -> dict | None:
    """Fine-tune and evaluate; returns the summary in the main process (None in the others)."""
    # ---- 1. processes, device, seeds; 2. backbone (a bad encoder source fails before the data scan)
    dist, device_type = start_processes(cfg)
    device = dist.device
    backbone, info = open_backbone(cfg.encoder, cfg.seed, saved=state and state["config"]["backbone"])
    cfg.backbone = info
    pre = Preprocessing.from_dict(info["preprocessing"])

    # ---- 3. classes and data, checked before anything trains --------------------------------------
    classes = Classes.from_dict(cfg.classes)
    show = progress and dist.is_main
    train_pairs, train_unmasked = scan_pairs(cfg.train_images, cfg.train_masks, classes, "train", show)
    val_pairs, val_unmasked = scan_pairs(cfg.val_images, cfg.val_masks, classes, "val", show)
    if train_unmasked or val_unmasked:
        log(dist, f"skipped photos without a mask: {train_unmasked} train, {val_unmasked} val")
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_pairs)} training pair(s) do not fill one batch of {cfg.batch_size}; "
                         "lower --batch-size")
    train_set = TrainSet(train_pairs, classes, cfg.base_size, cfg.crop_size, cfg.seed)
    val_set = EvalSet(val_pairs, classes, cfg.base_size)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world, rank=dist.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=True)
    per_process = cfg.batch_size // dist.world

    # ---- 4. network, optimiser, schedule (precomputed per step) -----------------------------------
    net = build_model(backbone, info, cfg.head, len(classes))
    if dist.enabled and device_type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device)
    model = net
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device_type == "cuda" else None)
    params = [{"params": [p for p in net.backbone.parameters() if p.requires_grad]},
              {"params": [p for p in net.classifier.parameters() if p.requires_grad]}]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    lr_at = poly_schedule(cfg.lr, cfg.epochs * steps_per_epoch).tolist()

    # ---- 5. resume, the run directory ---------------------------------------------------------------
    at = RunState.start(out, cfg, state, net, optimizer, per_process, steps_per_epoch, dist)

    def save(epoch: int, position: int):
        if dist.is_main:
            save_run(out, model=net, optimizer=optimizer, epoch=epoch, position=position,
                     step=epoch * steps_per_epoch + position // per_process, config=cfg, history=at.history)

    def loss_of(batch):
        photos, targets = batch
        x = pre.normalize_tensor(photos.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        logits = model(x)["out"]
        valid = (targets >= 0).sum().clamp(min=1)
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / valid, 0

    def end_epoch(record: dict, last: bool):
        if last or (cfg.eval_every and record["epoch"] % cfg.eval_every == 0):
            t_eval = time.perf_counter()
            confusion, kept = evaluate(net, val_set, pre, len(classes), device, dist, keep=cfg.draw if last else 0,
                                       workers=cfg.workers, progress=show)
            record.update(segmentation_scores(confusion, classes.names))
            if last and cfg.draw:
                kept = _gather_kept(kept, dist)  # each image was scored by one process
                if dist.is_main:
                    draw_predictions(out / "predictions", val_set, kept, classes)
            record["eval_seconds"] = time.perf_counter() - t_eval
            log(dist, f"epoch {record['epoch']}: loss {record['train_loss']:.4f}, mIoU {record['mean_iou']:.4f}, "
                      f"pixel accuracy {record['pixel_accuracy']:.4f}")
        at.history.append(record)
        save(record["epoch"], 0)
        if dist.is_main:
            write_json(out / "metrics.json", {
                "task": "segment", "encoder": cfg.encoder, "backbone": info, "head": cfg.head,
                "classes": classes.names, "ignore_index": classes.ignore_index,
                "train_pairs": len(train_pairs), "val_pairs": len(val_pairs),
                "skipped_without_mask": {"train": train_unmasked, "val": val_unmasked},
                "mean_iou_note": "mean over classes present in val ground truth or predictions",
                "history": at.history, "final": record if last else None})

    # ---- 6. the training loop ------------------------------------------------------------------------
    loop = EpochLoop(model=model, optimizer=optimizer, train_set=train_set, sampler=sampler, lr_at=lr_at,
                     per_process=per_process, epochs=cfg.epochs, workers=cfg.workers, seed=cfg.seed, dist=dist,
                     device=device, desc="segment", show=show)
    stopped = loop.run(at, loss_of, end_epoch, save)
    final = at.history[-1] if at.history and at.history[-1]["epoch"] == cfg.epochs else None
    summary = {"run": str(out), "epochs": at.epoch, "steps": at.step, "stopped": stopped, "world_size": dist.world,
               **({k: final[k] for k in ("mean_iou", "pixel_accuracy", "classes_scored", "train_loss")}
                  if final else {})}
    barrier(dist)
    shutdown(dist)
    return summary if dist.is_main else None


def _gather_kept(kept: dict, dist: Dist) -> dict:
    merged = {}
    for part in all_gather_objects(kept, dist):
        merged.update(part)
    return merged


# ============================================================================================
# Settings and command line
# ============================================================================================
DATA_FLAGS = ("train_images", "train_masks", "val_images", "val_masks")


@dataclass
class SegmentSettings(DenseSettings):
    """Every setting of a segmentation run (config.json; `--set name=value` reaches each by name)."""
    task: str = "segment"
    train_images: str | None = None   # absolute paths
    train_masks: str | None = None
    val_images: str | None = None
    val_masks: str | None = None
    classes_file: str | None = None
    ignore_index: int | None = None   # None: the classes file's
    classes: dict | None = None       # read from the classes file when the run starts
    head: str = "deeplabv3"
    epochs: int = 30
    lr: float = 0.02
    base_size: int = 520
    crop_size: int = 480

    def absolute_paths(self) -> None:
        for key in (*DATA_FLAGS, "classes_file"):
            if getattr(self, key):
                setattr(self, key, str(Path(getattr(self, key)).resolve()))

    def check(self) -> None:
        missing = [f for f in ("encoder", "classes_file", *DATA_FLAGS) if getattr(self, f) is None]
        if missing:
            raise UsageError(f"missing {', '.join('--' + f.replace('_file', '').replace('_', '-') for f in missing)}")
        if self.head not in HEADS:
            raise UsageError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        self.check_ranges(crop_size=16)


def get_args_parser() -> argparse.ArgumentParser:
    d = SegmentSettings()
    p = argparse.ArgumentParser(
        prog="python -m trainer.segment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune a BYOL encoder for semantic segmentation (torchvision FCN or DeepLabV3 head) "
                    "and evaluate it by mean IoU and pixel accuracy.",
        epilog="Masks: single-channel PNGs named like their photo (photo.jpg -> photo.png) holding class ids.\n"
               "Classes file: JSON {\"ignore_index\": 0, \"classes\": {\"1\": \"person\", ...}} or [\"name\", ...].\n"
               "Mean IoU: over the classes present in the validation ground truth or predictions.\n"
               "RUN/: config.json, checkpoint.pt, metrics.json, predictions/*.jpg (prediction | ground truth).\n"
               "Several GPUs: torchrun --nproc_per_node N -m trainer.segment ...")
    p.add_argument("--encoder", help=f"backbone: {ENCODER_SOURCE_HELP}")
    p.add_argument("--train-images", help="folder of training photos")
    p.add_argument("--train-masks", help="folder of training masks (photos without one are skipped)")
    p.add_argument("--val-images", help="folder of validation photos")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument("--classes", dest="classes_file", help="classes file (JSON), see below")
    p.add_argument("--out", required=True, help="run directory (new, unless --resume)")
    p.add_argument("--ignore-index", type=int, help="mask value that counts for nothing "
                   "(default: the classes file's ignore_index, else none)")
    p.add_argument("--head", choices=HEADS, help=f"segmentation head (default {d.head})")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"global batch size (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate, decayed by poly(0.9) per step (default {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"SGD weight decay (default {d.weight_decay})")
    p.add_argument("--base-size", type=int, help="shorter side for evaluation; training resizes it to 0.5-2x "
                   f"this (default {d.base_size})")
    p.add_argument("--crop-size", type=int, help=f"square training crop (default {d.crop_size})")
    add_run_flags(p, d, "validation images drawn into RUN/predictions after the last epoch",
                  "continue the run in --out from its checkpoint (its settings are kept; a larger --epochs "
                  "extends it, the poly schedule re-laid over the new total)")
    return p


def resolve_settings(args: argparse.Namespace, saved: dict | None) -> SegmentSettings:
    """A new run: defaults, --set, flags. A resumed run: its own settings; only --epochs, --workers,
    --device, --eval-every and --draw may change."""
    s = settings.resolve(SegmentSettings, saved, args.set, vars(args), prepare=SegmentSettings.absolute_paths)
    s.check()
    if s.classes is None:
        s.classes = Classes.load(s.classes_file, s.ignore_index).to_dict()
        s.ignore_index = s.classes["ignore_index"]
    return s


@cli_main(errors=(ImageDecodeError,))
def main(argv=None) -> int:
    return finetune_main(argv, get_args_parser(), "segment", resolve_settings, train)


if __name__ == "__main__":
    sys.exit(main())
