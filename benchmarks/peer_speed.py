"""byolkit against the other BYOL libraries on PyPI, on CPU: byol-pytorch (lucidrains) and lightly.

Two modes.

Throughput (the default): byolkit's training step against byol-pytorch's, the same network, in
alternating rounds in one process:

    python benchmarks/peer_speed.py --json benchmarks/results/peer_speed_fp32.json
    python benchmarks/peer_speed.py --precision bf16 --json benchmarks/results/peer_speed_bf16.json

kNN under a wall-clock budget (--budget): each library trains the same backbone (the byolkit
preset's: cpu-quick's resnet18_w16 with the small stem, 24 px, batch 128) on the same training
images for the same budget with its own documented recipe, one after the other, then the same
weighted kNN (trainer.knn, k=200, T=0.1; the training split as memory, the test split as
queries) scores each encoder; training images/s come with it:

    python benchmarks/peer_speed.py --budget 10m --train ../shared/data/cifar10/train.zip \
        --test ../shared/data/cifar10/test.zip --json peer_knn.json

  byolkit       `python -m trainer.pretrain --preset cpu-quick --time-budget ...` (its process, as a
                user runs it; decoding into memory is outside the budget, as for the others)
  byol-pytorch  its README: BYOL(net, image_size, hidden_layer="avgpool") with its defaults
                (4096-d hidden, 256-d projection, tau 0.99, simplicial embeddings, its own batch
                augmentation), Adam lr 3e-4, `loss = learner(images)`, update_moving_average(), fp32;
                random batches of the images decoded once into memory (uint8, as float in [0, 1])
  lightly       its BYOL example (examples/pytorch/byol.py): BYOLProjectionHead and
                BYOLPredictionHead (hidden 1024, 256-d), NegativeCosineSimilarity, update_momentum
                with cosine_schedule(0.996 -> 1) over the budget, SGD lr 0.06, BYOLTransform (no blur)
                per image in a torch DataLoader over the same in-memory images, fp32

Each encoder is evaluated with the input normalisation it trained with.

Throughput mode in detail:

Both contenders train the same backbone (byolkit's `build_encoder(arch, "small")`: a torchvision
ResNet with the 3x3 stride-1 stem and no max-pool, identical initial weights) with the same
projector and predictor sizes, batch size and image size, on the same batches drawn from one
random uint8 image tensor held in memory (byolkit's "memory" pipeline). One image is one sample
giving two views. Each contender runs its own full training step:

  byolkit       the trainer's own step: trainer.pretrain.build_pretraining's parts (the model in
                channels_last, BatchAugment(byol_views(blur=False), crop=True) on the uint8 batch:
                per-image random crop/flip/jitter/grayscale/solarise, as the cifar10 preset; LARS
                over its parameter groups, the predictor's with its LR scale) and
                trainer.pretrain.train_step at the peak LR: BYOL loss, backward, step, update_target.
  byol-pytorch  the batch converted to float in [0, 1], then `loss = learner(images)` with its
                default augmentation (torchvision transforms applied to the whole batch at once),
                backward, the optimiser step (by default the same LARS over its online
                parameters, --peer-optimizer adam for its README's Adam), update_moving_average().
                Simplicial embeddings (on by default in byol-pytorch >= 0.9) are switched off so
                that its projector is the paper's MLP, the same as byolkit's; --peer-sem keeps them.

With --precision bf16 each whole step's forward runs under torch.autocast("cpu", torch.bfloat16)
(byolkit's augmentation runs outside it, as in trainer.pretrain; byol-pytorch's augmentation is
inside its forward, so it runs under autocast too).

The contenders are timed in alternating rounds in one process (A, B, A, B, ...), so a background
load hits both alike; the report gives each one's median images/s over the rounds and the ratio
byolkit / byol-pytorch (of the medians, and the median of the per-round ratios). Images per
CPU-second of this process (all its threads) are reported too: less sensitive to other processes
than wall time (on an otherwise idle machine, images/s ~ images/CPU-s x threads).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, now, write_json

from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD
from trainer.config import ByolConfig, Config, DataConfig, ModelConfig, OptimConfig, RunConfig
from trainer.models import ARCHITECTURES, build_encoder
from trainer.optim import build_optimizer, parameter_groups
from trainer.pretrain import build_pretraining, train_step

BYOLKIT, PEER, LIGHTLY = "byolkit", "byol-pytorch", "lightly"


def import_peer():
    """byol_pytorch's BYOL class and version, or a one-line reason why it cannot be imported."""
    try:
        from byol_pytorch import BYOL as PeerBYOL
    except ImportError as e:  # the package, or one of its own dependencies (einops, accelerate, ...)
        return None, None, (f"byol-pytorch is not importable ({e}); install it with `pip install byol-pytorch` "
                            f"(it is in byolkit's test extra: `pip install -e .[test]`)")
    try:
        from importlib.metadata import version
        peer_version = version("byol-pytorch")
    except Exception:  # noqa: BLE001 - a vendored copy without metadata
        peer_version = "unknown"
    return PeerBYOL, peer_version, None


def lars(groups, args):
    return build_optimizer("lars", groups, args.base_lr * args.batch_size / 256, momentum=0.9,
                           weight_decay=args.weight_decay, trust_coefficient=1e-3)


class Timed(nn.Module):
    """Wraps a module and adds the wall time of its calls to `seconds` (CPU: no async to sync)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.seconds = inner, 0.0

    def forward(self, x):
        t0 = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - t0
        return out


def byolkit_config(args) -> Config:
    """The throughput mode's settings as a trainer.pretrain configuration (the cifar10 preset's recipe
    at the sizes asked for)."""
    return Config(
        model=ModelConfig(arch=args.arch, stem="small", projector_hidden_dim=args.hidden_dim,
                          projection_dim=args.projection_dim, predictor_hidden_dim=args.hidden_dim),
        data=DataConfig(image_size=args.image_size, mean=list(CIFAR10_MEAN), std=list(CIFAR10_STD), blur=False),
        optim=OptimConfig(name="lars", base_lr=args.base_lr, weight_decay=args.weight_decay,
                          batch_size=args.batch_size),
        byol=ByolConfig(tau_base=args.tau), run=RunConfig(device="cpu", precision=args.precision))


class Byolkit:
    """trainer.pretrain's own parts and step (build_pretraining, train_step), at the peak LR."""
    name = BYOLKIT

    def __init__(self, args):
        torch.manual_seed(args.seed)
        self.parts = build_pretraining(byolkit_config(args), torch.device("cpu"))
        self.model = self.parts.byol.train()
        self.tau, self.aug_seconds = args.tau, 0.0

    @contextlib.contextmanager
    def _phase(self, name: str):
        t0 = time.perf_counter()
        yield
        if name == "augment":
            self.aug_seconds += time.perf_counter() - t0

    def step(self, raw: torch.Tensor) -> torch.Tensor:
        loss, _ = train_step(self.parts, raw, self.parts.lr_peak, self.tau, phase=self._phase)
        return loss.detach()


class Peer:
    name = PEER

    def __init__(self, args, amp, PeerBYOL):
        torch.manual_seed(args.seed)
        encoder, _ = build_encoder(args.arch, "small")  # the same module, same stem, same initial weights
        kwargs = {}
        if "use_simplicial_embeddings" in inspect.signature(PeerBYOL).parameters:  # byol-pytorch >= 0.9
            kwargs["use_simplicial_embeddings"] = args.peer_sem
        self.learner = PeerBYOL(encoder, image_size=args.image_size, hidden_layer="avgpool",
                                projection_size=args.projection_dim, projection_hidden_size=args.hidden_dim,
                                moving_average_decay=args.tau, **kwargs)
        # byol-pytorch's own default augmentation, timed; augment2 is the same module as augment1
        timed = Timed(self.learner.augment1)
        self.learner.augment1 = self.learner.augment2 = timed
        self.timed = timed
        if args.peer_channels_last:
            self.learner = self.learner.to(memory_format=torch.channels_last)
        self.learner.train()
        if args.peer_optimizer == "adam":  # its README: Adam(learner.parameters(), lr=3e-4)
            self.optimizer = torch.optim.Adam(self.learner.parameters(), lr=3e-4)
        else:
            self.optimizer = lars(parameter_groups([self.learner.online_encoder, self.learner.online_predictor],
                                                   args.weight_decay), args)
        self.amp, self.channels_last = amp, args.peer_channels_last

    @property
    def aug_seconds(self) -> float:
        return self.timed.seconds

    def step(self, raw: torch.Tensor) -> torch.Tensor:
        images = raw.float().div_(255.0)  # its transforms want float images in [0, 1]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.amp():
            loss = self.learner(images)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.learner.update_moving_average()
        return loss.detach()


def run(args, PeerBYOL) -> dict:
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" \
        else contextlib.nullcontext
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.num_images, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=gen)
    total = args.warmup + args.rounds * args.steps_per_round
    # The same batch sequence for both contenders: batch k is the k-th slice of a fixed random order.
    batches = [torch.randperm(args.num_images, generator=gen)[:args.batch_size] for _ in range(total)]
    contenders = [Byolkit(args), Peer(args, amp, PeerBYOL)]
    torch.manual_seed(args.seed)
    state = {c.name: {"next": 0, "rates": [], "cpu_rates": [], "aug_share": [], "losses": [], "load": []}
             for c in contenders}

    def steps(c, n):
        s = state[c.name]
        loss = None
        for _ in range(n):
            loss = c.step(images[batches[s["next"]]])
            s["next"] += 1
        return float(loss)

    for c in contenders:  # warmup (allocator, oneDNN kernel selection), untimed
        if args.warmup:
            state[c.name]["losses"].append(steps(c, args.warmup))
    for r in range(args.rounds):
        for c in contenders:
            aug0 = c.aug_seconds
            t0, cpu0 = time.perf_counter(), time.process_time()
            loss = steps(c, args.steps_per_round)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            s = state[c.name]
            images_done = args.steps_per_round * args.batch_size
            s["rates"].append(images_done / elapsed)
            s["cpu_rates"].append(images_done / cpu)
            s["aug_share"].append((c.aug_seconds - aug0) / elapsed)
            s["losses"].append(loss)
            s["load"].append(os.getloadavg()[0])
            print(f"round {r + 1}/{args.rounds} {c.name:13s} {s['rates'][-1]:8.1f} images/s "
                  f"{s['cpu_rates'][-1]:8.1f} images/CPU-s (augmentation {100 * s['aug_share'][-1]:.0f}% of "
                  f"step time, loss {loss:.4f}, load {s['load'][-1]:.1f})", file=sys.stderr, flush=True)

    results = {}
    for c in contenders:
        s = state[c.name]
        results[c.name] = {"images_per_s": statistics.median(s["rates"]), "images_per_s_rounds": s["rates"],
                           "images_per_cpu_s": statistics.median(s["cpu_rates"]),
                           "images_per_cpu_s_rounds": s["cpu_rates"],
                           "augmentation_share": statistics.median(s["aug_share"]), "losses": s["losses"],
                           "load_average_1min_rounds": s["load"]}
    a, b = results[BYOLKIT], results[PEER]
    per_round = [x / y for x, y in zip(a["images_per_s_rounds"], b["images_per_s_rounds"], strict=True)]
    return {"results": results, "ratio": a["images_per_s"] / b["images_per_s"],
            "ratio_per_round": per_round, "ratio_per_round_median": statistics.median(per_round),
            "ratio_cpu": a["images_per_cpu_s"] / b["images_per_cpu_s"]}


# ============================================================================================
# kNN mode: the same wall-clock budget for each library's own recipe, then kNN top-1
# ============================================================================================
class MemoryImages(torch.utils.data.Dataset):
    """uint8 [N, 3, S, S] images held in memory, each returned as a PIL image through `transform`
    (what torchvision.datasets.CIFAR10 does, the data set lightly's example trains on)."""

    def __init__(self, images: torch.Tensor, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i].permute(1, 2, 0).numpy()))


def train_byolkit(args, cfg, out: Path) -> tuple[nn.Module, dict]:
    """byolkit: the preset through the real trainer command line, as a user runs it."""
    import shutil
    import subprocess

    from trainer.checkpoint import load_encoder
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "trainer.pretrain", "--preset", args.preset, "--data", args.train,
           "--out", str(out), "--time-budget", str(args.budget), "--epochs", "100000", "--no-progress",
           "--set", f"data.workers={args.workers}"]
    if args.tiny:
        cmd += ["--set", "data.image_size=16", "--set", "model.projector_hidden_dim=64",
                "--set", "model.predictor_hidden_dim=64", "--batch-size", str(args.batch_size)]
    else:
        cmd += ["--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    encoder, _ = load_encoder(out)
    steps = summary["steps"]
    return encoder, {"steps": steps, "train_seconds": summary["train_seconds"], "process_wall_s": wall,
                     "images_per_s": steps * args.batch_size / summary["train_seconds"],
                     "final_loss": summary["loss"], "recipe": f"trainer.pretrain --preset {args.preset}"}


def train_byol_pytorch(args, images: torch.Tensor, PeerBYOL) -> tuple[nn.Module, dict]:
    """byol-pytorch: its README's loop (Adam 3e-4, default BYOL arguments, `learner(images)`,
    update_moving_average) on random batches of the uint8 images held in memory, float in [0, 1]."""
    torch.manual_seed(args.seed)
    encoder, _ = build_encoder(args.arch, "small")
    learner = PeerBYOL(encoder, image_size=args.image_size, hidden_layer="avgpool").train()
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    gen = torch.Generator().manual_seed(args.seed)
    steps, loss, t0 = 0, torch.tensor(float("nan")), time.perf_counter()
    while time.perf_counter() - t0 < args.budget:
        batch = images[torch.randint(0, len(images), (args.batch_size,), generator=gen)].float().div_(255.0)
        loss = learner(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        learner.update_moving_average()
        steps += 1
    seconds = time.perf_counter() - t0
    return encoder, {"steps": steps, "train_seconds": seconds, "images_per_s": steps * args.batch_size / seconds,
                     "final_loss": float(loss.detach()),
                     "recipe": "README: BYOL(net, image_size, hidden_layer='avgpool') defaults (projection "
                               "256/4096, tau 0.99, its augmentation), Adam lr 3e-4, fp32"}


def train_lightly(args, images: torch.Tensor) -> tuple[nn.Module, dict]:
    """lightly: its BYOL example (examples/pytorch/byol.py): BYOLProjectionHead/BYOLPredictionHead,
    NegativeCosineSimilarity, update_momentum with cosine_schedule(0.996 -> 1), SGD lr 0.06, and
    BYOLTransform (no blur) applied per image in DataLoader workers. The momentum schedule, laid out
    over epochs in the example, runs over the elapsed share of the time budget here."""
    import copy

    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(args.seed)
    backbone, dim = build_encoder(args.arch, "small")
    projection_head = BYOLProjectionHead(dim, args.lightly_hidden_dim, 256)
    prediction_head = BYOLPredictionHead(256, args.lightly_hidden_dim, 256)
    backbone_momentum, projection_head_momentum = copy.deepcopy(backbone), copy.deepcopy(projection_head)
    deactivate_requires_grad(backbone_momentum)
    deactivate_requires_grad(projection_head_momentum)
    online = nn.ModuleList([backbone, projection_head, prediction_head]).train()

    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=args.image_size, gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=args.image_size, gaussian_blur=0.0))
    loader = torch.utils.data.DataLoader(MemoryImages(images, transform), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True, num_workers=args.workers,
                                         persistent_workers=args.workers > 0,
                                         generator=torch.Generator().manual_seed(args.seed))
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(online.parameters(), lr=0.06)

    def forward(x):
        return prediction_head(projection_head(backbone(x).flatten(start_dim=1)))

    def forward_momentum(x):
        return projection_head_momentum(backbone_momentum(x).flatten(start_dim=1)).detach()

    steps, loss, t0 = 0, torch.tensor(float("nan")), time.perf_counter()
    budget_ms = int(args.budget * 1000)
    done = False
    while not done:
        for x0, x1 in loader:
            elapsed = time.perf_counter() - t0
            if elapsed >= args.budget:
                done = True
                break
            m = cosine_schedule(int(elapsed * 1000), budget_ms, 0.996, 1)
            update_momentum(backbone, backbone_momentum, m=m)
            update_momentum(projection_head, projection_head_momentum, m=m)
            p0, z0 = forward(x0), forward_momentum(x0)
            p1, z1 = forward(x1), forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    seconds = time.perf_counter() - t0
    del loader
    return backbone, {"steps": steps, "train_seconds": seconds, "images_per_s": steps * args.batch_size / seconds,
                      "final_loss": float(loss.detach()),
                      "recipe": f"examples/pytorch/byol.py: heads {dim}-{args.lightly_hidden_dim}-256, SGD lr 0.06, "
                                f"momentum cosine 0.996->1, BYOLTransform(input_size={args.image_size}, no blur), "
                                f"{args.workers} DataLoader worker(s), fp32"}


def run_knn(args, PeerBYOL, peer_version) -> dict:
    from importlib.metadata import version

    from trainer.config import preset
    from trainer.data import decode_all, open_collection
    from trainer.knn import embed, knn_accuracy

    cfg = preset(args.preset)
    if args.tiny:
        cfg.data.image_size = 16
    pre = cfg.data.preprocessing()
    train_set, test_set = open_collection(args.train), open_collection(args.test)
    if train_set.labels is None or test_set.labels is None:
        raise SystemExit("error: --train and --test need class sub-folders (labels) for the kNN evaluation")
    t0 = time.perf_counter()
    x_train, y_train, _ = decode_all(train_set, pre, args.workers, progress=False)
    x_test, y_test, _ = decode_all(test_set, pre, args.workers, progress=False)
    remap = torch.tensor([train_set.classes.index(c) for c in test_set.classes])
    y_test = remap[y_test]
    num_classes = len(train_set.classes)
    print(f"decoded {len(x_train)} + {len(x_test)} images at {pre.input_size} px in "
          f"{time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    args.arch, args.image_size = cfg.model.arch, cfg.data.image_size

    # Each encoder is evaluated with the normalisation it was trained with: the preset's (CIFAR-10
    # mean/std) for byolkit, ImageNet's for byol-pytorch's and lightly's default augmentations.
    imagenet_pre = dataclasses.replace(pre, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def knn(encoder: nn.Module, contract=pre) -> dict:
        encoder = encoder.to(memory_format=torch.channels_last)
        bank = embed(encoder, x_train, contract, torch.device("cpu"), precision="bf16")
        queries = embed(encoder, x_test, contract, torch.device("cpu"), precision="bf16")
        return knn_accuracy(bank, y_train, queries, y_test, num_classes, k=200, temperature=0.1)

    results = {}
    torch.manual_seed(args.seed)
    random_encoder, _ = build_encoder(cfg.model.arch, cfg.model.stem)
    results["random_init"] = {"knn": knn(random_encoder)}
    print(f"random init: kNN top-1 {results['random_init']['knn']['top1']:.4f}", file=sys.stderr, flush=True)
    trainers = {BYOLKIT: lambda: train_byolkit(args, cfg, Path(args.out) / "byolkit_run"),
                PEER: lambda: train_byol_pytorch(args, x_train, PeerBYOL),
                LIGHTLY: lambda: train_lightly(args, x_train)}
    for name in args.contenders:
        print(f"{name}: training for {args.budget:.0f}s", file=sys.stderr, flush=True)
        encoder, info = trainers[name]()
        t0 = time.perf_counter()
        info["knn"] = knn(encoder, pre if name == BYOLKIT else imagenet_pre)
        info["knn_normalisation"] = "preset (CIFAR-10 mean/std)" if name == BYOLKIT else "ImageNet mean/std"
        info["knn_seconds"] = time.perf_counter() - t0
        info["load_average_1min"] = os.getloadavg()[0]
        results[name] = info
        print(f"{name}: {info['steps']} steps, {info['images_per_s']:.1f} images/s, "
              f"kNN top-1 {info['knn']['top1']:.4f}", file=sys.stderr, flush=True)
    versions = {}
    for pkg in ("byol-pytorch", "lightly"):
        try:
            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001
            versions[pkg] = None
    return {"results": results, "versions": versions,
            "data": {"train": args.train, "test": args.test, "train_images": len(x_train),
                     "test_images": len(x_test), "image_size": pre.input_size},
            "knn_protocol": "trainer.knn: weighted kNN, k=200, T=0.1, cosine; train split as memory, test split "
                            "as queries, bf16 embedding of the centre crop, the same for every contender"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", choices=ARCHITECTURES, help="encoder (with byolkit's small stem)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128, help="images per step (each gives two views)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per contender, alternating")
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per contender before the rounds")
    p.add_argument("--hidden-dim", type=int, default=4096, help="projector and predictor hidden size (both)")
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--num-images", type=int, default=2048, help="random uint8 images held in memory")
    p.add_argument("--base-lr", type=float, default=1.0, help="LARS LR = base_lr * batch / 256 (cifar10 preset)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--tau", type=float, default=0.99, help="target EMA decay (both)")
    p.add_argument("--peer-optimizer", choices=["lars", "adam"], default="lars",
                   help="byol-pytorch's optimiser: the same LARS as byolkit, or its README's Adam")
    p.add_argument("--peer-channels-last", action="store_true",
                   help="also run byol-pytorch in channels_last (its README uses the default layout)")
    p.add_argument("--peer-sem", action="store_true",
                   help="keep byol-pytorch's default simplicial embeddings (an extra layer before the projector)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the settings and results here")
    k = p.add_argument_group("kNN mode (--budget): each library's own recipe for the same wall-clock budget, "
                             "then kNN top-1 on --test")
    k.add_argument("--budget", type=parse_duration, default=None, metavar="DURATION",
                   help="training budget per contender (e.g. 10m); switches to the kNN mode")
    k.add_argument("--train", help="labelled training images (folder or zip), e.g. CIFAR-10 train.zip")
    k.add_argument("--test", help="labelled test images (the kNN queries)")
    k.add_argument("--preset", default="cpu-quick", help="byolkit preset; its arch, stem and image size "
                   "are used by every contender")
    k.add_argument("--contenders", nargs="+", default=[BYOLKIT, PEER, LIGHTLY], choices=[BYOLKIT, PEER, LIGHTLY])
    k.add_argument("--workers", type=int, default=1, help="decoding workers; lightly's DataLoader workers")
    k.add_argument("--lightly-hidden-dim", type=int, default=1024,
                   help="lightly's head hidden size (its example: 1024)")
    k.add_argument("--out", default="benchmarks/results/peer_knn", help="scratch directory (byolkit's run)")
    k.add_argument("--tiny", action="store_true", help="16 px and small heads for byolkit (a smoke test)")
    args = p.parse_args(argv)
    if args.budget is not None:
        return main_knn(p, args)
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (BatchNorm in the heads)")
    if args.num_images < args.batch_size:
        p.error("--num-images must be at least --batch-size")
    if min(args.rounds, args.steps_per_round) < 1 or args.warmup < 0:
        p.error("--rounds and --steps-per-round must be at least 1, --warmup at least 0")

    PeerBYOL, peer_version, why = import_peer()
    if PeerBYOL is None:
        print(f"error: {why}", file=sys.stderr)
        return 2

    settings = {k: v for k, v in vars(args).items() if k != "json"}
    settings.update(stem="small", byolkit_step="trainer.pretrain.build_pretraining + train_step",
                    byolkit_augmentation="BatchAugment(byol_views(blur=False)), CIFAR-10 mean/std",
                    byolkit_optimizer="lars", byolkit_channels_last=True,
                    peer_augmentation="byol-pytorch default (SimCLR-style torchvision transforms per batch)")
    out = {"date": now(), "machine": machine(),
           "byol_pytorch_version": peer_version, "settings": settings,
           "load_average_before": list(os.getloadavg())}
    out.update(run(args, PeerBYOL))
    out["load_average_after"] = list(os.getloadavg())

    res = out["results"]
    print(f"\n{args.arch} (small stem), {args.image_size}px, batch {args.batch_size}, {args.precision}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, byol-pytorch {peer_version}")
    print(f"{'contender':14s} {'images/s (median)':>18s} {'images/CPU-s':>13s} {'aug share':>10s}  images/s per round")
    for name in (BYOLKIT, PEER):
        r = res[name]
        rounds = " ".join(f"{x:.1f}" for x in r["images_per_s_rounds"])
        print(f"{name:14s} {r['images_per_s']:18.1f} {r['images_per_cpu_s']:13.1f} "
              f"{100 * r['augmentation_share']:9.0f}%  {rounds}")
    print(f"ratio byolkit/byol-pytorch: {out['ratio']:.3f} images/s (median of per-round ratios "
          f"{out['ratio_per_round_median']:.3f}), {out['ratio_cpu']:.3f} images/CPU-s")
    if args.json:
        write_json(args.json, out)
    return 0


def parse_duration(text: str) -> float:
    from trainer.pretrain import parse_duration as parse
    return parse(text)


def main_knn(p: argparse.ArgumentParser, args) -> int:
    if not args.train or not args.test:
        p.error("--budget needs --train and --test (labelled images)")
    for spec in (args.train, args.test):
        if not Path(spec).exists():
            p.error(f"no such file or folder: {spec}")
    if args.budget <= 0 or args.batch_size < 2 or args.workers < 0:
        p.error("--budget must be positive, --batch-size at least 2, --workers at least 0")
    PeerBYOL, peer_version, why = import_peer()
    if PEER in args.contenders and PeerBYOL is None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if LIGHTLY in args.contenders:
        try:
            import lightly  # noqa: F401
        except ImportError as e:
            print(f"error: lightly is not importable ({e}); install it with `pip install lightly` "
                  f"(it is in byolkit's test extra)", file=sys.stderr)
            return 2
    out = {"date": now(), "machine": machine(),
           "mode": "knn", "budget_s": args.budget, "batch_size": args.batch_size, "preset": args.preset,
           "load_average_before": list(os.getloadavg())}
    out.update(run_knn(args, PeerBYOL, peer_version))
    out["load_average_after"] = list(os.getloadavg())
    res = out["results"]
    print(f"\n{args.arch} (small stem), {args.image_size}px, batch {args.batch_size}, budget {args.budget:.0f}s "
          f"each, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'contender':14s} {'steps':>7s} {'images/s':>9s} {'kNN top-1':>10s} {'kNN top-5':>10s}")
    for name, r in res.items():
        steps = f"{r['steps']:7d}" if "steps" in r else f"{'-':>7s}"
        ips = f"{r['images_per_s']:9.1f}" if "images_per_s" in r else f"{'-':>9s}"
        print(f"{name:14s} {steps} {ips} {r['knn']['top1']:10.4f} {r['knn']['top5']:10.4f}")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
