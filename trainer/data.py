"""Image data: folders, zip archives and torchvision data sets, read the same way.

`open_collection` turns what the user names into an `ImageCollection` (images, optional
labels). Two training pipelines read it:
  * memory: every image decoded once with the preprocessing contract into one uint8 tensor;
    crops and colour augmentations then run batched on the training device. For small images
    (CIFAR-like) this removes decoding from the training loop altogether.
  * stream: data-loader workers decode each image and take both random crops; the colour
    augmentations run batched on the training device.
Unreadable images are skipped and counted, never a crash mid-epoch.
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from contract.preprocess import IMAGE_EXTENSIONS, ImageDecodeError, Preprocessing, load_rgb

from .augment import ViewAugmentation, crop_resize_pil
from .runtime import DataError  # defined once in trainer.runtime; the app imports it from here

TORCHVISION_DATASETS = ("cifar10", "cifar100", "stl10")


class ImageCollection:
    """An indexable set of images with optional integer labels."""

    description: str = ""
    classes: Sequence[str] = ()  # class names by label; subclasses set a list
    labels: list[int] | None = None

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int):
        """The image at `index` as an RGB PIL image; raises ImageDecodeError if unreadable."""
        raise NotImplementedError

    def name(self, index: int) -> str:
        return str(index)


def _labels_from_paths(relpaths: list[str]) -> tuple[list[int] | None, list[str]]:
    """ImageFolder convention: the first folder names the class, if every image has one."""
    tops = [p.split("/", 1)[0] if "/" in p else None for p in relpaths]
    if not tops or any(t is None for t in tops):
        return None, []
    classes = sorted(set(tops))
    index = {c: i for i, c in enumerate(classes)}
    return [index[t] for t in tops], classes


class FolderCollection(ImageCollection):
    def __init__(self, root: Path):
        self.root = root
        self.paths = sorted(
            str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith("."))
        self.labels, self.classes = _labels_from_paths(self.paths)
        self.description = f"folder {root}"

    def __len__(self):
        return len(self.paths)

    def load(self, index):
        return load_rgb(self.root / self.paths[index])

    def name(self, index):
        return self.paths[index]


# the largest zip member read as an image (a PNG at the 64-megapixel decode limit is at most ~190 MB)
MAX_MEMBER_BYTES = 256 * 2**20


class ZipCollection(ImageCollection):
    """Images inside a zip archive, read member by member without unpacking."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not a readable zip archive ({e})") from None
        self.members = sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                              and not n.endswith("/") and "__MACOSX" not in n)
        self.labels, self.classes = _labels_from_paths(self.members)
        self.description = f"zip {path}"
        self._zip, self._pid = None, None

    def __len__(self):
        return len(self.members)

    def _archive(self) -> zipfile.ZipFile:
        # One handle per process: zipfile handles must not be shared across forked workers.
        if self._zip is None or self._pid != os.getpid():
            self._zip, self._pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip

    def load(self, index):
        member = self.members[index]
        try:
            size = self._archive().getinfo(member).file_size  # what reading it unpacks (the reader stops there)
            if size > MAX_MEMBER_BYTES:
                raise ImageDecodeError(f"{member} in {self.path} unpacks to {size} bytes, above the limit of "
                                       f"{MAX_MEMBER_BYTES}")
            data = self._archive().read(member)
        except (zipfile.BadZipFile, OSError, KeyError) as e:
            raise ImageDecodeError(f"cannot read {member} from {self.path}: {e}") from None
        return load_rgb(data, name=f"{self.path}:{member}")

    def name(self, index):
        return self.members[index]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_zip"], state["_pid"] = None, None
        return state


class TorchvisionCollection(ImageCollection):
    def __init__(self, name: str, split: str):
        import torchvision
        root = Path(os.environ.get("BYOLKIT_DATA", Path.home() / ".cache" / "byolkit" / "datasets"))
        cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
               "stl10": torchvision.datasets.STL10}[name]
        try:
            if name == "stl10":
                self.dataset = cls(str(root), split=split if split != "train" else "train+unlabeled", download=True)
                self.labels = [int(y) if y >= 0 else -1 for y in self.dataset.labels]
            else:
                self.dataset = cls(str(root), train=(split == "train"), download=True)
                self.labels = [int(y) for y in self.dataset.targets]
        except Exception as e:  # noqa: BLE001 - offline, or a broken download (any error of any data set)
            raise DataError(f"could not load torchvision data set {name!r} into {root}: {e}. "
                            "Offline, pass an image folder or a zip archive instead.") from None
        self.classes = list(getattr(self.dataset, "classes", []))
        self.description = f"torchvision {name} ({split})"

    def __len__(self):
        return len(self.dataset)

    def load(self, index):
        return self.dataset[index][0].convert("RGB")


class SubsetCollection(ImageCollection):
    """Some images of a collection, by index, with their labels and names."""

    def __init__(self, base: ImageCollection, indices: list[int]):
        self.base, self.indices = base, list(indices)
        self.classes = base.classes
        self.labels = [base.labels[i] for i in self.indices] if base.labels is not None else None
        self.description = f"{len(self.indices)} of {base.description}"

    def __len__(self):
        return len(self.indices)

    def load(self, index):
        return self.base.load(self.indices[index])

    def name(self, index):
        return self.base.name(self.indices[index])


def sample_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """A seeded sample of min(n, k) of range(n), in increasing order."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].sort().values


def sample_collection(collection: ImageCollection, k: int, seed: int) -> ImageCollection:
    """`collection` itself when it holds at most `k` images, else a seeded sample of `k` of them."""
    if len(collection) <= k:
        return collection
    return SubsetCollection(collection, sample_indices(len(collection), k, seed).tolist())


def open_collection(spec: str) -> ImageCollection:
    """An image folder, a zip archive, or a torchvision data set name with an optional split
    (`cifar10`, `cifar10:test`)."""
    name, _, split = str(spec).partition(":")
    if name.lower() in TORCHVISION_DATASETS and not Path(spec).exists():
        return TorchvisionCollection(name.lower(), split or "train")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"data path {spec} does not exist (expected an image folder, a zip archive, "
                        f"or one of {', '.join(TORCHVISION_DATASETS)})")
    if path.is_dir():
        collection = FolderCollection(path)
    elif zipfile.is_zipfile(path):
        collection = ZipCollection(path)
    else:
        raise DataError(f"{spec} is neither a folder nor a zip archive of images")
    if len(collection) == 0:
        raise DataError(f"no images found in {spec} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return collection


# --------------------------------------------------------------------------------------------
# Which images each step sees
# --------------------------------------------------------------------------------------------
class BatchPlan:
    """The images of every step: a seeded permutation per epoch, split across processes.

    Steps are indexed globally, so a resumed run picks up exactly where it stopped.
    """

    def __init__(self, num_images: int, global_batch: int, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu"):
        if global_batch > num_images:
            raise DataError(f"batch size {global_batch} is larger than the data set ({num_images} images); "
                            "lower --batch-size")
        self.n, self.global_batch, self.seed, self.rank, self.world = num_images, global_batch, seed, rank, world
        self.device = torch.device(device)
        self.local_batch = global_batch // world
        self.steps_per_epoch = num_images // global_batch  # the last partial batch is dropped
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            # Kept on the training device: slicing it then needs no host-to-device copy per step.
            # Once an epoch it is copied there from pinned memory without blocking: a pageable
            # copy would wait for all the device work queued so far.
            perm = torch.randperm(self.n, generator=g)
            if self.device.type == "cuda":
                perm = perm.pin_memory()
            self._epoch, self._perm = epoch, perm.to(self.device, non_blocking=True)
        start = k * self.global_batch + self.rank * self.local_batch
        return self._perm[start:start + self.local_batch]


# --------------------------------------------------------------------------------------------
# Decoding everything once (memory pipeline, feature extraction)
# --------------------------------------------------------------------------------------------
class _ContractDataset(Dataset):
    """Each image through the preprocessing contract (resize, centre crop) as uint8 CHW."""

    def __init__(self, collection: ImageCollection, pre: Preprocessing):
        self.collection, self.pre = collection, pre

    def __len__(self):
        return len(self.collection)

    def __getitem__(self, i):
        label = self.collection.labels[i] if self.collection.labels is not None else -1
        try:
            hwc = self.pre.resize_and_crop(self.collection.load(i))
            return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1))), label, True
        except ImageDecodeError:
            s = self.pre.input_size
            return torch.zeros(3, s, s, dtype=torch.uint8), label, False


def decode_all(collection: ImageCollection, pre: Preprocessing, workers: int = 2,
               progress: bool = True, desc: str = "decoding") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every readable image, preprocessed -> (uint8 [N, 3, S, S], labels [N] (-1: none), skipped)."""
    from tqdm import tqdm
    loader = DataLoader(_ContractDataset(collection, pre), batch_size=256, num_workers=workers,
                        persistent_workers=False)
    images, labels, oks = [], [], []
    for x, y, ok in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images.append(x)
        labels.append(y)
        oks.append(ok)
    ok = torch.cat(oks)
    return torch.cat(images)[ok], torch.cat(labels)[ok], int((~ok).sum())


# --------------------------------------------------------------------------------------------
# Streaming two cropped views per image (stream pipeline)
# --------------------------------------------------------------------------------------------
class TwoViewCrops(Dataset):
    """Worker side of the stream pipeline: decode, then both views' random crop and flip.

    Keys are (step, index) pairs so that each crop's randomness depends only on the run's seed,
    the step and the image, never on which worker ran it: resumes reproduce the same crops.
    """

    def __init__(self, collection: ImageCollection, size: int, views: tuple[ViewAugmentation, ViewAugmentation],
                 seed: int):
        self.collection, self.size, self.views, self.seed = collection, size, views, seed

    def __len__(self):
        return len(self.collection)

    def __getitem__(self, key):
        step, index = key
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 10_000_019 + index)
        try:
            image = self.collection.load(index)
        except ImageDecodeError:
            return None
        return torch.stack([crop_resize_pil(image, self.size, v, g) for v in self.views])


def collate_crops(batch):
    """Stack the readable items -> (uint8 [B, 2, 3, S, S], number skipped)."""
    good = [b for b in batch if b is not None]
    if not good:
        return None, len(batch)
    return torch.stack(good), len(batch) - len(good)


class _PlanSampler(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, start_step: int, total_steps: int):
        self.plan, self.start, self.total = plan, start_step, total_steps

    def __iter__(self):
        for step in range(self.start, self.total):
            yield [(step, int(i)) for i in self.plan.indices(step)]

    def __len__(self):
        return self.total - self.start


def fill_batch(batch: torch.Tensor | None, size: int) -> torch.Tensor | None:
    """A batch short of unreadable images, refilled to `size` by repeating its readable ones (the
    shapes stay fixed, and BatchNorm never sees a batch of one); None when none was readable."""
    if batch is None or len(batch) == 0:
        return None
    if len(batch) == size:
        return batch
    return batch[torch.arange(size, device=batch.device) % len(batch)]


def prefetch_to_device(batches, device: torch.device):
    """(batch, skipped) pairs from `batches`, each batch copied to `device` one step ahead.

    On a GPU the copy of the next batch (from the loader's pinned memory) runs on a side stream
    while the current step computes; the compute stream waits for it only when it takes the batch.
    On the CPU the pairs pass through unchanged."""
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)

    def start(item):
        batch, skipped = item
        if batch is None:
            return None, skipped
        with torch.cuda.stream(stream):
            return batch.to(device, non_blocking=True), skipped

    it = iter(batches)
    ahead = next(it, None)
    ahead = start(ahead) if ahead is not None else None
    while ahead is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(stream)
        batch, skipped = ahead
        if batch is not None:
            batch.record_stream(current)  # its memory belongs to the compute stream's work from here
        nxt = next(it, None)
        ahead = start(nxt) if nxt is not None else None
        yield batch, skipped


def stream_loader(collection: ImageCollection, plan: BatchPlan, size: int, views, seed: int,
                  start_step: int, total_steps: int, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(TwoViewCrops(collection, size, views, seed),
                      batch_sampler=_PlanSampler(plan, start_step, total_steps), num_workers=workers,
                      # one iterator spans the whole run (the sampler yields every remaining step), so
                      # the workers live for the run: persistent_workers would change nothing; each
                      # keeps prefetch_factor batches decoded ahead of the training loop
                      collate_fn=collate_crops, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None,
                      # its own generator: creating the loader must not draw from the global RNG,
                      # or a resumed run's augmentations would drift from the uninterrupted run's
                      generator=torch.Generator().manual_seed(seed))
