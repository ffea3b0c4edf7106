"""Object detection (Faster R-CNN) and instance segmentation (Mask R-CNN) fine-tuned from an encoder.

    python -m trainer.detect --encoder runs/byol --train-images coco/train2017 \\
        --train-ann coco/annotations/instances_train2017.json --val-images coco/val2017 \\
        --val-ann coco/annotations/instances_val2017.json --out runs/det
    torchrun --nproc_per_node 8 -m trainer.detect ... --norm sync

torchvision's Faster R-CNN with a ResNet-FPN backbone whose ResNet is the given encoder (a BYOL
run, `random:...` or `supervised:ARCH`, see --help); Mask R-CNN when every annotation carries a
`segmentation` (polygons or RLE). Data in COCO format. The run directory receives checkpoint.pt
(atomic, every epoch and on Ctrl-C; `--resume` continues exactly), metrics.json (COCO mAP@[.5:.95],
AP50, AP75 via pycocotools, per-epoch losses) and predictions/*.jpg (boxes, masks, class names and
scores at or above --draw-score over the first --draw validation photos, ground truth in white).

Bad input is refused before training with a one-line message; a box that sticks out of its image is
clipped and one with no area skipped, both counted and reported; an image that fails to decode
mid-epoch is skipped and counted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from contract.preprocess import MAX_PIXELS

from .. import checkpoint as ckpt_io
from .. import settings
from ..distributed import Dist, all_gather_objects, barrier, init_distributed, shutdown
from ..optim import warmup_multistep
from ..pretrain import DeferredMetrics
from ..runtime import (
    DataError,
    Stop,
    TrainingError,
    UsageError,
    cli_main,
    log,
    open_run,
    progress_bar,
    resolve_device,
    seed_process,
)
from ..settings import add_set_flag
from ..sources import ENCODER_SOURCE_HELP, open_encoder
from .common import (
    NORM_CHOICES,
    RunSettings,
    check_norm_for_device,
    default_norm,
    default_trainable_layers,
    draw_predictions,
    epoch_batches,
    palette,
    prepare_resnet,
    resnet_fpn,
    steps_per_epoch,
    wrap_distributed,
    write_json,
)

LOG_EVERY = 20  # steps between the host's (deferred) looks at the losses


# ============================================================================================
# COCO data: read and check everything before training
# ============================================================================================
@dataclass
class CocoSet:
    """One split, validated: images that exist and open, boxes clipped to them (xyxy), contiguous labels."""
    name: str
    images_dir: Path
    images: list[dict]                      # id, file_name, width, height, path
    categories: list[dict]                  # id, name (the file's own ids)
    boxes: list[np.ndarray]                 # per image [N, 4] xyxy, in the image's pixels
    category_ids: list[np.ndarray]          # per image [N] (file ids)
    segmentations: list[list] | None        # per image, per box: polygons or RLE (Mask R-CNN)
    crowd: list[list[dict]]                 # per image: iscrowd annotations (evaluation only)
    clipped: int = 0
    skipped: int = 0
    skipped_reasons: dict = field(default_factory=dict)

    @property
    def has_masks(self) -> bool:
        return self.segmentations is not None

    def __len__(self) -> int:
        return len(self.images)

    def coco_ground_truth(self) -> dict:
        """The cleaned annotations as a COCO dict for pycocotools (boxes as clipped for training)."""
        anns, next_id = [], 1
        for img, boxes, cats, crowd, segs in zip(self.images, self.boxes, self.category_ids, self.crowd,
                                                 self.segmentations or [None] * len(self.images)):
            for k, (b, c) in enumerate(zip(boxes, cats)):
                w, h = float(b[2] - b[0]), float(b[3] - b[1])
                ann = {"id": next_id, "image_id": img["id"], "category_id": int(c), "iscrowd": 0,
                       "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h}
                if segs is not None:
                    ann["segmentation"] = segs[k]
                anns.append(ann)
                next_id += 1
            for a in crowd:
                area = float(a.get("area", a["bbox"][2] * a["bbox"][3]))
                anns.append({**a, "id": next_id, "iscrowd": 1, "area": area})
                next_id += 1
        return {"images": [{"id": i["id"], "width": i["width"], "height": i["height"]} for i in self.images],
                "categories": [{"id": c["id"], "name": c["name"]} for c in self.categories], "annotations": anns}


def _number_list(v, n: int) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float)) for x in v)


def load_coco(images_dir: str | Path, ann_path: str | Path, masks: str = "auto", name: str = "train") -> CocoSet:
    """Read and check a COCO instances file against its image folder; raises DataError on unusable input.

    masks: "auto" (Mask R-CNN data when every non-crowd annotation has a segmentation), "off".
    """
    images_dir, ann_path = Path(images_dir), Path(ann_path)
    flag = f"--{name}-ann"
    if not ann_path.is_file():
        raise DataError(f"{flag}: no annotation file at {ann_path}")
    if not images_dir.is_dir():
        raise DataError(f"--{name}-images: no image folder at {images_dir}")
    try:
        data = json.loads(ann_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{flag}: {ann_path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise DataError(f"{flag}: {ann_path} is not a COCO instances file (needs lists 'images', 'annotations', "
                        f"'categories')")
    categories = _read_categories(data["categories"], ann_path, flag)
    images = _read_images(data["images"], images_dir, ann_path, flag)
    boxes, cats, segs, crowd, counts = _read_annotations(data["annotations"], images, categories, ann_path, flag)
    clipped, skipped, reasons, with_seg = counts
    kept = sum(len(b) for b in boxes)
    use_masks = False
    if masks == "auto" and with_seg:
        if with_seg != kept:
            raise DataError(f"{flag}: {with_seg} of {kept} annotations carry a segmentation; Mask R-CNN needs "
                            f"all of them (pass --no-masks to train boxes only)")
        use_masks = True
    return CocoSet(name, images_dir, images, categories,
                   [np.asarray(b, np.float32).reshape(-1, 4) for b in boxes],
                   [np.asarray(c, np.int64) for c in cats], segs if use_masks else None, crowd,
                   clipped, skipped, reasons)


def _read_categories(entries: list, ann_path: Path, flag: str) -> list[dict]:
    categories = []
    for c in entries:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DataError(f"{flag}: a category without an integer id: {c!r}")
        categories.append({"id": c["id"], "name": str(c.get("name", c["id"]))})
    cat_ids = [c["id"] for c in categories]
    if not categories:
        raise DataError(f"{flag}: {ann_path} lists no categories")
    if len(set(cat_ids)) != len(cat_ids):
        raise DataError(f"{flag}: category ids repeat in {ann_path}")
    return categories


def _read_images(entries: list, images_dir: Path, ann_path: Path, flag: str) -> list[dict]:
    """Every listed file exists and opens, at the size the file says."""
    if not entries:
        raise DataError(f"{flag}: {ann_path} lists no images")
    images, seen = [], set()
    for im in entries:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DataError(f"{flag}: an image entry without id and file_name: {im!r}")
        if im["id"] in seen:
            raise DataError(f"{flag}: image id {im['id']} is listed twice")
        path = images_dir / im["file_name"]
        if not path.is_file():
            missing = sum(not (images_dir / i.get("file_name", "")).is_file() for i in entries)
            raise DataError(f"{flag}: image {im['file_name']!r} (id {im['id']}) is not in {images_dir} "
                            f"({missing} of {len(entries)} listed images are missing)")
        try:
            with Image.open(path) as f:  # header only: cheap, and catches files that are no image at all
                width, height = f.size
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{flag}: {path} is not a readable image ({type(e).__name__})") from None
        if width * height > MAX_PIXELS:
            raise DataError(f"{flag}: {path} is {width}x{height} pixels, above the limit of {MAX_PIXELS}")
        if im.get("width", width) != width or im.get("height", height) != height:
            raise DataError(f"{flag}: {path} is {width}x{height} but the annotations say "
                            f"{im.get('width')}x{im.get('height')}: the annotations belong to another image")
        seen.add(im["id"])
        images.append({"id": im["id"], "file_name": im["file_name"], "width": width, "height": height,
                       "path": str(path)})
    return images


def _read_annotations(anns: list, images: list[dict], categories: list[dict], ann_path: Path, flag: str):
    """Boxes clipped to their image (xyxy), per image -> (boxes, category ids, segmentations, crowd
    annotations, (clipped, skipped, skip reasons, boxes with a segmentation))."""
    if not anns:
        raise DataError(f"{flag}: {ann_path} holds no annotations (an empty annotation set cannot be learned "
                        f"from or evaluated)")
    index = {im["id"]: i for i, im in enumerate(images)}
    known = {c["id"] for c in categories}
    boxes, cats, segs, crowd = ([[] for _ in images] for _ in range(4))
    clipped = skipped = with_seg = 0
    reasons: dict[str, int] = {}
    for a in anns:
        if not isinstance(a, dict):
            raise DataError(f"{flag}: an annotation is not an object: {a!r}")
        aid = a.get("id", "?")
        if a.get("image_id") not in index:
            raise DataError(f"{flag}: annotation {aid} names image id {a.get('image_id')!r}, which is not in "
                            f"'images' of {ann_path}")
        if a.get("category_id") not in known:
            raise DataError(f"{flag}: annotation {aid} has category_id {a.get('category_id')!r}, which is not "
                            f"among the {len(known)} categories (ids {min(known)}-{max(known)})")
        if not _number_list(a.get("bbox"), 4):
            raise DataError(f"{flag}: annotation {aid} has no bbox [x, y, width, height]: {a.get('bbox')!r}")
        i = index[a["image_id"]]
        img = images[i]
        x, y, w, h = (float(v) for v in a["bbox"])
        if not all(np.isfinite([x, y, w, h])):
            raise DataError(f"{flag}: annotation {aid} has a non-finite bbox {a['bbox']!r}")
        seg = a.get("segmentation")
        if seg:
            _check_segmentation(seg, img, aid, flag)
        if a.get("iscrowd", 0):
            crowd[i].append({k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation", "area") if k in a})
            continue
        with_seg += bool(seg)
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
            skipped += 1
            reason = "no area" if w <= 0 or h <= 0 else "outside the image"
            reasons[reason] = reasons.get(reason, 0) + 1
            continue
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clipped += 1
        boxes[i].append([x0, y0, x1, y1])
        cats[i].append(a["category_id"])
        segs[i].append(seg)
    if not sum(len(b) for b in boxes):
        raise DataError(f"{flag}: none of the {len(anns)} annotations in {ann_path} is a usable box "
                        f"({skipped} skipped: {reasons})")
    return boxes, cats, segs, crowd, (clipped, skipped, reasons, with_seg)


def _check_segmentation(seg, img: dict, aid, flag: str) -> None:
    """Polygons: lists of >= 3 points; RLE: its size must be the image's (a mask of another image)."""
    if isinstance(seg, dict):
        size = seg.get("size")
        if not _number_list(size, 2) or "counts" not in seg:
            raise DataError(f"{flag}: annotation {aid} has an RLE segmentation without size and counts")
        if [int(size[0]), int(size[1])] != [img["height"], img["width"]]:
            raise DataError(f"{flag}: the mask of annotation {aid} is {int(size[1])}x{int(size[0])} but its image "
                            f"{img['file_name']} is {img['width']}x{img['height']}")
    elif isinstance(seg, list):
        for poly in seg:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 \
                    or not all(isinstance(v, (int, float)) for v in poly):
                raise DataError(f"{flag}: annotation {aid} has a polygon that is not a flat list of >= 3 x,y points")
    else:
        raise DataError(f"{flag}: annotation {aid} has a segmentation that is neither polygons nor RLE")


def check_categories(train: CocoSet, val: CocoSet) -> None:
    unknown = {c["id"] for c in val.categories} - {c["id"] for c in train.categories}
    if unknown:
        raise DataError(f"--val-ann has category ids the training annotations lack: {sorted(unknown)[:10]}")
    if val.has_masks != train.has_masks:
        have, lack = ("--train-ann", "--val-ann") if train.has_masks else ("--val-ann", "--train-ann")
        raise DataError(f"{have} carries instance masks but {lack} does not (pass --no-masks for boxes only)")


def decode_masks(segs: list, height: int, width: int) -> np.ndarray:
    """COCO polygons / RLE -> uint8 [N, H, W]."""
    from pycocotools import mask as mask_utils
    out = np.zeros((len(segs), height, width), np.uint8)
    for k, seg in enumerate(segs):
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg["counts"], list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        out[k] = mask_utils.decode(rle)
    return out


class DetectionDataset(Dataset):
    """(uint8 [3, H, W] image, target) per image; None for an image that no longer decodes (skipped)."""

    def __init__(self, coco: CocoSet, label_of: dict[int, int]):
        self.coco, self.label_of = coco, label_of

    def __len__(self):
        return len(self.coco)

    def __getitem__(self, i: int):
        img = self.coco.images[i]
        try:
            # no EXIF rotation: COCO annotations are in the stored pixel order
            with Image.open(img["path"]) as f:
                image = f.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None
        if image.size != (img["width"], img["height"]):
            return None
        target = {"boxes": torch.from_numpy(self.coco.boxes[i]),
                  "labels": torch.tensor([self.label_of[int(c)] for c in self.coco.category_ids[i]], dtype=torch.int64),
                  "image_id": img["id"], "index": i}
        if self.coco.has_masks:
            target["masks"] = torch.from_numpy(decode_masks(self.coco.segmentations[i], img["height"], img["width"]))
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), target


def collate(items):
    return [it for it in items if it is not None], sum(it is None for it in items)


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    width = image.shape[-1]
    target = dict(target)
    b = target["boxes"].clone()
    b[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = b
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return image.flip(-1), target


# ============================================================================================
# Metrics: COCO mAP through pycocotools
# ============================================================================================
def coco_metrics(ground_truth: dict, results: list[dict], iou_type: str = "bbox") -> dict:
    """COCO AP@[.5:.95] (mAP), AP50 and AP75 over all areas, 100 detections per image.

    ground_truth: a COCO instances dict; results: COCO result records (image_id, category_id, bbox
    [x, y, w, h] or segmentation RLE, score).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"info": {}, **ground_truth}
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 means "no ground truth to score against"; with at least one box that cannot happen
    return {"mAP": max(float(ev.stats[0]), 0.0), "AP50": max(float(ev.stats[1]), 0.0),
            "AP75": max(float(ev.stats[2]), 0.0)}


def to_coco_results(output: dict, image_id: int, category_of: list[int]) -> list[dict]:
    """One image's torchvision predictions -> COCO result records (file category ids, xywh, RLE masks)."""
    boxes = output["boxes"].tolist()
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    records = [{"image_id": image_id, "category_id": category_of[lab], "score": s,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s, lab in zip(boxes, scores, labels)]
    if "masks" in output:
        from pycocotools import mask as mask_utils
        binary = (output["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for rec, m in zip(records, binary):
            rle = mask_utils.encode(np.asfortranarray(m))
            rle["counts"] = rle["counts"].decode("ascii")
            rec["segmentation"] = rle
    return records


# ============================================================================================
# Model
# ============================================================================================
def build_detector(encoder: torch.nn.Module, info: dict, num_classes: int, *, masks: bool, trainable_layers: int,
                   norm: str, fpn_channels: int = 0, min_size: int = 800, max_size: int = 1333,
                   anchor_sizes=(32, 64, 128, 256, 512), head_size: int = 1024, rois_per_image: int = 512):
    """Faster R-CNN (or Mask R-CNN) over a ResNet-FPN made from `encoder`; num_classes counts the background."""
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    if len(anchor_sizes) != 5:
        raise UsageError(f"--anchor-sizes needs 5 sizes (one per FPN level P2-P6), got {len(anchor_sizes)}")
    backbone = resnet_fpn(prepare_resnet(encoder, trainable_layers, norm), fpn_channels)
    c = backbone.out_channels
    pre = info["preprocessing"]
    kwargs = {"min_size": min_size, "max_size": max_size, "image_mean": list(pre.mean), "image_std": list(pre.std),
              "rpn_anchor_generator": AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5),
              "box_head": TwoMLPHead(c * 7 * 7, head_size),
              "box_predictor": FastRCNNPredictor(head_size, num_classes),
              "box_batch_size_per_image": rois_per_image}
    if masks:
        return MaskRCNN(backbone, mask_head=MaskRCNNHeads(c, [c] * 4, 1),
                        mask_predictor=MaskRCNNPredictor(c, c, num_classes), **kwargs)
    return FasterRCNN(backbone, **kwargs)


# ============================================================================================
# Settings and command line
# ============================================================================================
@dataclass
class DetectSettings(RunSettings):
    """Every setting of a detection run (config.json; `--set name=value` reaches each by name)."""
    FIXED_ON_RESUME: ClassVar[tuple] = (  # a resume may not change these: the schedule, the model, the data
        "encoder", "train_images", "train_ann", "val_images", "val_ann", "epochs", "batch_size", "lr",
        "weight_decay", "min_size", "max_size", "anchor_sizes", "fpn_channels", "head_size", "rois_per_image",
        "trainable_layers", "norm", "warmup_steps", "seed", "no_masks")
    epochs: int = 12
    batch_size: int = 2
    lr: float = 0.02
    draw: int = 8
    eval_every: int = 0
    train_images: str | None = None
    train_ann: str | None = None
    val_images: str | None = None
    val_ann: str | None = None
    min_size: int = 800
    max_size: int = 1333
    anchor_sizes: str = "32,64,128,256,512"
    fpn_channels: int = 0
    head_size: int = 1024
    rois_per_image: int = 512
    warmup_steps: int = 500
    trainable_layers: int | None = None   # None: 3 for a pretrained encoder, 5 for a random one
    norm: str | None = None               # None: frozen for a pretrained encoder, bn for a random one
    no_masks: bool = False
    draw_score: float = 0.5

    def anchors(self) -> tuple[int, ...]:
        return tuple(int(v) for v in str(self.anchor_sizes).split(","))

    def check(self) -> None:
        for key in ("encoder", "train_images", "train_ann", "val_images", "val_ann"):
            if not getattr(self, key):
                raise UsageError(f"--{key.replace('_', '-')} is required")
        for key in ("epochs", "batch_size", "min_size", "max_size", "head_size", "rois_per_image"):
            if getattr(self, key) < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be at least 1")
        if self.lr <= 0:
            raise UsageError("--lr must be positive")
        try:
            sizes = self.anchors()
        except ValueError:
            raise UsageError(f"--anchor-sizes: expected five integers like 32,64,128,256,512, got "
                             f"{self.anchor_sizes!r}") from None
        if len(sizes) != 5 or min(sizes) < 1:
            raise UsageError(f"--anchor-sizes needs five positive sizes (P2-P6), got {self.anchor_sizes!r}")


def get_args_parser() -> argparse.ArgumentParser:
    d = DetectSettings()
    p = argparse.ArgumentParser(
        prog="python -m trainer.detect", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune Faster R-CNN / Mask R-CNN (ResNet-FPN) from an encoder on COCO-format data; "
                    "report COCO mAP@[.5:.95] and AP50 on the validation split.",
        epilog="Example (CPU, a few minutes):\n  python -m trainer.detect --encoder runs/byol --train-images "
               "coco/train2017 --train-ann coco/instances_train2017.json \\\n    --val-images coco/val2017 "
               "--val-ann coco/instances_val2017.json --out runs/det --epochs 4 \\\n    --min-size 256 "
               "--max-size 384 --anchor-sizes 16,32,64,128,256 --batch-size 4\n"
               "--resume continues the run in --out with its own settings (config.json); without a checkpoint "
               "there yet, it starts the run.")
    p.add_argument("--encoder", help=f"the backbone's initialisation: {ENCODER_SOURCE_HELP}")
    p.add_argument("--train-images", help="folder of training images (file_name in the annotations is relative to it)")
    p.add_argument("--train-ann", help="COCO instances JSON for the training images")
    p.add_argument("--val-images", help="folder of validation images")
    p.add_argument("--val-ann", help="COCO instances JSON for the validation images")
    p.add_argument("--out", required=True, help="run directory (must be new unless --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=int, help=f"images per step over all processes (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"SGD learning rate for that batch (default {d.lr}); x0.1 at 2/3 and "
                   "8/9 of training")
    p.add_argument("--weight-decay", type=float, help=f"(default {d.weight_decay})")
    p.add_argument("--warmup-steps", type=int, help=f"linear LR warmup steps, at most a fifth of the run "
                   f"(default {d.warmup_steps})")
    p.add_argument("--min-size", type=int, help=f"shorter image side fed to the network (default {d.min_size})")
    p.add_argument("--max-size", type=int, help=f"longer side cap (default {d.max_size})")
    p.add_argument("--anchor-sizes", help=f"five anchor sizes in pixels, P2-P6 (default {d.anchor_sizes}); "
                   "scale them with --min-size")
    p.add_argument("--fpn-channels", type=int, help="FPN width (default: 256, or the last stage's width if narrower)")
    p.add_argument("--head-size", type=int, help=f"box head MLP width (default {d.head_size})")
    p.add_argument("--rois-per-image", type=int, help=f"sampled RoIs per training image (default {d.rois_per_image})")
    p.add_argument("--trainable-layers", type=int, choices=range(6), metavar="0-5",
                   help="how many ResNet stages to train, from layer4 down to conv1 (default: 3 for a pretrained "
                        "encoder, 5 for random)")
    p.add_argument("--norm", choices=NORM_CHOICES, help="backbone BatchNorm: frozen statistics, sync (over torchrun "
                   "GPUs) or plain bn (default: frozen for a pretrained encoder, bn for random)")
    p.add_argument("--no-masks", action="store_true", default=None,
                   help="train boxes only even when the annotations carry segmentations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="(default auto)")
    p.add_argument("--workers", type=int, help=f"data-loading processes (default {d.workers})")
    p.add_argument("--seed", type=int, help=f"(default {d.seed})")
    p.add_argument("--eval-every", type=int, help="also evaluate every N epochs (default: at the end only)")
    p.add_argument("--draw", type=int, help=f"validation photos to draw predictions on (default {d.draw})")
    p.add_argument("--draw-score", type=float, help=f"lowest score drawn (default {d.draw_score}); ground-truth "
                   "boxes are drawn in white")
    add_set_flag(p)
    p.add_argument("--stop-after-steps", type=int, default=None, help="stop (checkpointed, resumable) after this "
                   "many steps in this invocation, e.g. for time-sliced jobs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def resolve_settings(args: argparse.Namespace, saved: dict | None) -> DetectSettings:
    """Defaults < the resumed run's settings < --set < flags given now (which a resume may not change)."""
    s = settings.resolve(DetectSettings, saved, args.set, vars(args))
    s.check()
    return s


# ============================================================================================
# Training
# ============================================================================================
@dataclass
class _Data:
    """Both splits, checked, and the label mapping: contiguous label -> file category id (0 = background)."""
    train: CocoSet
    val: CocoSet
    category_of: list[int]
    names: list[str]

    @property
    def label_of(self) -> dict[int, int]:
        return {cid: k for k, cid in enumerate(self.category_of) if k}


def _open_data(s: DetectSettings, dist: Dist) -> _Data:
    masks = "off" if s.no_masks else "auto"
    train_set = load_coco(s.train_images, s.train_ann, masks, "train")
    val_set = load_coco(s.val_images, s.val_ann, masks, "val")
    check_categories(train_set, val_set)
    for split in (train_set, val_set):
        if split.clipped or split.skipped:
            log(dist, f"{split.name}: {split.clipped} box(es) clipped to their image, {split.skipped} skipped "
                      f"({', '.join(f'{n} {r}' for r, n in split.skipped_reasons.items()) or 'none'})")
    return _Data(train_set, val_set, [0] + [c["id"] for c in train_set.categories],
                 ["background"] + [c["name"] for c in train_set.categories])


def _build_model(s: DetectSettings, data: _Data, dist: Dist, device_type: str):
    """The detector (trainable_layers and norm resolved by the encoder's kind) -> (model, encoder info)."""
    encoder, info = open_encoder(s.encoder, seed=s.seed)
    if s.trainable_layers is None:
        s.trainable_layers = default_trainable_layers(info["source"])
    if s.norm is None:
        s.norm = default_norm(info["source"])
    check_norm_for_device(s.norm, dist, device_type)
    model = build_detector(encoder, info, len(data.category_of), masks=data.train.has_masks,
                           trainable_layers=s.trainable_layers, norm=s.norm, fpn_channels=s.fpn_channels,
                           min_size=s.min_size, max_size=s.max_size, anchor_sizes=s.anchors(),
                           head_size=s.head_size, rois_per_image=s.rois_per_image)
    return model, info


class _Run:
    """What one training invocation carries from step to step: the history, the counters, the stop."""

    def __init__(self, start_step: int, history: list, skipped_images: int):
        self.step, self.history, self.skipped_images = start_step, history, skipped_images
        self.steps_this_run = 0


def train(s: DetectSettings, out: Path, resume_state: dict | None = None, progress: bool = True,
          stop_after_steps: int | None = None) -> dict:
    # ---- 1. processes, device, seeds ----------------------------------------------------------
    device_type = resolve_device(s.device)
    dist = init_distributed(device_type)
    device = dist.device
    if s.batch_size % dist.world:
        raise UsageError(f"--batch-size {s.batch_size} must divide evenly over {dist.world} processes")
    seed_process(s.seed, dist.rank)

    # ---- 2. data, checked up front; 3. model ----------------------------------------------------
    data = _open_data(s, dist)
    model, info = _build_model(s, data, dist, device_type)
    # channels_last: on CPU the convolution backward of the default layout takes a path about ten
    # times slower (measured on this project's 2-core machine); on GPUs it suits the tensor cores
    model = model.to(device, memory_format=torch.channels_last)
    task = "mask_rcnn" if data.train.has_masks else "faster_rcnn"

    # ---- 4. optimiser and the per-step schedule -----------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=s.weight_decay)
    per_rank_batch = s.batch_size // dist.world
    spe = steps_per_epoch(len(data.train), per_rank_batch, dist.world)
    total_steps = s.epochs * spe
    lr_at = warmup_multistep(s.lr, total_steps, min(s.warmup_steps, total_steps // 5))

    # ---- 5. resume, the run directory ------------------------------------------------------------
    run = _Run(0, [], 0)
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        ckpt_io.set_rng_state(resume_state["rng"])
        seed_process(s.seed, dist.rank, resumed_at=int(resume_state["step"]))
        run = _Run(int(resume_state["step"]), list(resume_state.get("history", [])),
                   int(resume_state.get("skipped_images", 0)))
        log(dist, f"resumed {out} at step {run.step}/{total_steps}")
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        settings.write_config(out, s)
    barrier(dist)
    net = wrap_distributed(model, s.norm, dist, device)

    def save():
        if dist.is_main:
            ckpt_io.save_checkpoint(out, model=model, optimizer=optimizer, step=run.step,
                                    config=settings.to_dict(s),
                                    extra={"history": run.history, "skipped_images": run.skipped_images,
                                           "task": task})

    loader_args = {"collate_fn": collate, "num_workers": s.workers, "persistent_workers": False,
                   "pin_memory": device.type == "cuda",  # pinned: the copies below do not block the host
                   "generator": torch.Generator().manual_seed(s.seed)}  # keeps the global RNG untouched
    dataset = DetectionDataset(data.train, data.label_of)

    # ---- 6. the training loop -----------------------------------------------------------------
    t_start = time.perf_counter()
    with Stop() as stop:
        bar = progress_bar(total_steps, run.step, progress and dist.is_main, desc="detect")
        while run.step < total_steps:
            epoch, skip = divmod(run.step, spe)
            batches = epoch_batches(len(dataset), per_rank_batch, s.seed, epoch, dist.rank, dist.world)[skip:]
            loader = DataLoader(dataset, batch_sampler=batches, **loader_args)
            t_epoch = time.perf_counter()
            sums, n_losses = _train_epoch(net, optimizer, loader, lr_at, s, run, bar, dist, device, epoch,
                                          stop, stop_after_steps)
            if run.step % spe == 0:  # the epoch is complete
                record = _epoch_record(epoch, run.step, float(lr_at[run.step - 1]), sums, n_losses, skip, t_epoch)
                if s.eval_every and (epoch + 1) % s.eval_every == 0 and run.step < total_steps:
                    record.update(_flat(evaluate(model, data.val, data.category_of, device, dist, progress)))
                run.history.append(record)
            save()
            if dist.is_main:
                write_json(out / "metrics.json", _metrics_doc(s, info, task, run, {}, data, done=False))
            stopped = stop_after_steps and run.steps_this_run >= stop_after_steps and run.step < total_steps
            if stop.requested or stopped:
                bar.close()
                log(dist, f"stopped at step {run.step}/{total_steps}; checkpoint written, continue with --resume")
                shutdown(dist)
                return {"stopped_at_step": run.step, "total_steps": total_steps}
        bar.close()

    # ---- 7. final evaluation, drawings, summary ------------------------------------------------
    metrics = evaluate(model, data.val, data.category_of, device, dist, progress)
    if dist.is_main:
        _draw(model, data.val, data.names, out / "predictions", s.draw, s.draw_score, device)
        doc = _metrics_doc(s, info, task, run, metrics, data, done=True)
        doc["train_seconds_this_invocation"] = time.perf_counter() - t_start
        write_json(out / "metrics.json", doc)
    barrier(dist)
    shutdown(dist)
    return {"task": task, "encoder": s.encoder, "backbone_init": info["source"], "epochs": s.epochs,
            "steps": total_steps, **_flat(metrics)}


def _train_epoch(net, optimizer, loader, lr_at, s: DetectSettings, run: _Run, bar, dist: Dist, device, epoch: int,
                 stop: Stop, stop_after_steps: int | None) -> tuple[dict, int]:
    """One epoch (or the rest of one) -> (summed loss parts, number of losses). The losses stay on the
    device; the host reads them one log interval late (DeferredMetrics), or at the epoch's end."""
    net.train()
    sums, n_losses = {}, 0
    logged = DeferredMetrics()
    nonfinite = torch.zeros((), device=device)
    for items, unreadable in loader:
        run.skipped_images += unreadable
        flips = torch.rand(len(items), generator=torch.Generator().manual_seed(s.seed * 1_000_003 + run.step))
        images, targets = [], []
        for (image, target), f in zip(items, flips.tolist()):
            image = image.to(device, non_blocking=True)
            target = {k: v.to(device, non_blocking=True) for k, v in target.items() if torch.is_tensor(v)}
            if f < 0.5:
                image, target = hflip(image, target)
            images.append(image.float().div_(255))
            targets.append(target)
        for g in optimizer.param_groups:
            g["lr"] = float(lr_at[run.step])
        if images:
            loss_dict = net(images, targets)
            loss = sum(loss_dict.values())
            nonfinite = torch.maximum(nonfinite, (~torch.isfinite(loss.detach())).float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k, v in loss_dict.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
            n_losses += 1
        run.step += 1
        run.steps_this_run += 1
        if dist.is_main:
            bar.update(1)
        if images and run.step % LOG_EVERY == 0:
            _check_losses(logged.pop(), s.lr, bar, dist, epoch)
            logged.push({"step": run.step}, loss=loss.detach(), nonfinite=nonfinite)
        if stop.requested or (stop_after_steps and run.steps_this_run >= stop_after_steps):
            break
    _check_losses(logged.pop(), s.lr, bar, dist, epoch)
    if float(nonfinite):  # once per epoch, before anything is saved
        raise TrainingError(f"the loss became non-finite by step {run.step}: lower --lr (now {s.lr}) "
                            f"or raise --warmup-steps")
    return {k: float(v) for k, v in sums.items()}, n_losses


def _epoch_record(epoch: int, step: int, lr: float, sums: dict, n_losses: int, skip: int, t_epoch: float) -> dict:
    """The history entry of a finished epoch; a resumed partial epoch's mean loss covers only part of it."""
    mean = sum(sums.values()) / max(n_losses, 1)
    record = {"epoch": epoch + 1, "step": step, "lr": lr, "loss": mean if skip == 0 else None,
              "loss_parts": {k: v / max(n_losses, 1) for k, v in sums.items()} if skip == 0 else None,
              "seconds": time.perf_counter() - t_epoch}
    if skip:
        record["loss_partial"] = mean
    return record


def _check_losses(record: dict | None, lr: float, bar, dist: Dist, epoch: int) -> None:
    """A loss record queued one log interval ago: stop on a non-finite loss, else show it."""
    if record is None:
        return
    if record["nonfinite"]:
        raise TrainingError(f"the loss became non-finite by step {record['step']}: lower --lr (now {lr}) "
                            f"or raise --warmup-steps")
    if dist.is_main:
        bar.set_postfix(loss=f"{record['loss']:.3f}", epoch=epoch + 1)


def _flat(metrics: dict) -> dict:
    """{"bbox": {"mAP": ..}, "segm": {..}} -> {"bbox_mAP": .., "segm_mAP": ..}."""
    return {f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()}


def _metrics_doc(s: DetectSettings, info: dict, task: str, run: _Run, metrics: dict, data: _Data, done: bool) -> dict:
    train_set, val_set = data.train, data.val
    return {"task": task, "complete": done, **metrics,
            "encoder": {"spec": s.encoder, "source": info["source"], "arch": info["arch"], "stem": info["stem"],
                        "fingerprint": info["fingerprint"]},
            "settings": settings.to_dict(s), "epochs": run.history,
            "data": {"train_images": len(train_set), "val_images": len(val_set),
                     "train_boxes": int(sum(len(b) for b in train_set.boxes)),
                     "val_boxes": int(sum(len(b) for b in val_set.boxes)),
                     "boxes_clipped": {"train": train_set.clipped, "val": val_set.clipped},
                     "boxes_skipped": {"train": train_set.skipped, "val": val_set.skipped},
                     "unreadable_train_images_skipped": run.skipped_images}}


@torch.no_grad()
def predict(model, coco: CocoSet, device, dist: Dist, progress: bool, indices=None, batch_size: int = 2):
    """(index, torchvision output on CPU) for this process's share of `coco`; unreadable images are left out."""
    model.eval()
    dataset = DetectionDataset(coco, {c["id"]: 0 for c in coco.categories})
    indices = list(range(len(coco)))[dist.rank::dist.world] if indices is None else indices
    loader = DataLoader(dataset, batch_sampler=[indices[i:i + batch_size] for i in range(0, len(indices), batch_size)],
                        collate_fn=collate, num_workers=0)
    from tqdm import tqdm
    outputs = []
    for items, _ in tqdm(loader, desc="evaluating", unit="batch", disable=not progress, leave=False):
        if not items:
            continue
        preds = model([im.to(device).float().div_(255) for im, _ in items])
        outputs += [(t["index"], {k: v.cpu() for k, v in p.items()}) for (_, t), p in zip(items, preds)]
    return outputs


def evaluate(model, coco: CocoSet, category_of: list[int], device, dist: Dist, progress: bool) -> dict:
    """COCO metrics of `model` on `coco` (boxes, and masks for Mask R-CNN); gathered on rank 0."""
    results = []
    for i, out in predict(model, coco, device, dist, progress and dist.is_main):
        results += to_coco_results(out, coco.images[i]["id"], category_of)
    results = [r for part in all_gather_objects(results, dist) for r in part]
    if not dist.is_main:
        return {}
    gt = coco.coco_ground_truth()
    metrics = {"bbox": coco_metrics(gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results])}
    if coco.has_masks:
        metrics["segm"] = coco_metrics(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], "segm")
    return metrics


def _draw(model, coco: CocoSet, names: list[str], folder: Path, count: int, min_score: float, device) -> None:
    colours = palette(len(names))
    for i, out in predict(model, coco, device, Dist(), False, indices=list(range(min(count, len(coco))))):
        keep = out["scores"] >= min_score
        labels = out["labels"][keep].tolist()
        captions = [f"{names[lab]} {sc:.2f}" for lab, sc in zip(labels, out["scores"][keep].tolist())]
        with Image.open(coco.images[i]["path"]) as f:
            image = torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1).contiguous()
        masks = (out["masks"][keep, 0] > 0.5) if "masks" in out else None
        draw_predictions(image, folder / (Path(coco.images[i]["file_name"]).stem + ".jpg"), boxes=out["boxes"][keep],
                         labels=captions, colours=[colours[lab] for lab in labels], masks=masks,
                         ground_truth=torch.from_numpy(coco.boxes[i]))


# ============================================================================================
@cli_main
def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    out = Path(args.out)
    state = open_run(out, args.resume)
    summary = train(resolve_settings(args, state["config"] if state else None), out, resume_state=state,
                    progress=not args.no_progress, stop_after_steps=args.stop_after_steps)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary line, from the main process
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
