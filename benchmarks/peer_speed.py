"""Training throughput of byolkit's BYOL step against the PyPI package byol-pytorch (lucidrains), on CPU.

    python benchmarks/peer_speed.py --json benchmarks/results/peer_speed_fp32.json
    python benchmarks/peer_speed.py --precision bf16 --json benchmarks/results/peer_speed_bf16.json

Both contenders train the same backbone (byolkit's `build_encoder(arch, "small")`: a torchvision
ResNet with the 3x3 stride-1 stem and no max-pool, identical initial weights) with the same
projector and predictor sizes, batch size and image size, on the same batches drawn from one
random uint8 image tensor held in memory (byolkit's "memory" pipeline). One image is one sample
giving two views. Each contender runs its own full training step:

  byolkit       trainer.augment.BatchAugment(byol_views(blur=False), crop=True) on the uint8 batch
                (per-image random crop/flip/jitter/grayscale/solarise, as the cifar10 preset), the
                model in channels_last as trainer.pretrain puts it, BYOL loss, backward,
                LARS (trainer.optim.build_optimizer over parameter_groups), update_target(tau).
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
import datetime
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.augment import BatchAugment, byol_views  # noqa: E402
from trainer.models import ARCHITECTURES, BYOL, build_encoder  # noqa: E402
from trainer.optim import build_optimizer, parameter_groups  # noqa: E402
from trainer.preprocess import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

BYOLKIT, PEER = "byolkit", "byol-pytorch"


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


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version()}


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


class Byolkit:
    name = BYOLKIT

    def __init__(self, args, amp):
        torch.manual_seed(args.seed)
        encoder, dim = build_encoder(args.arch, "small")
        self.model = BYOL(encoder, dim, args.hidden_dim, args.projection_dim, args.hidden_dim)
        self.model = self.model.to(memory_format=torch.channels_last).train()  # as trainer.pretrain
        self.augment = BatchAugment(byol_views(blur=False), args.image_size, CIFAR10_MEAN, CIFAR10_STD, crop=True)
        m = self.model
        self.optimizer = lars(parameter_groups([m.encoder, m.projector, m.predictor], args.weight_decay), args)
        self.tau, self.amp, self.aug_seconds = args.tau, amp, 0.0

    def step(self, raw: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        view1, view2 = self.augment(raw)
        self.aug_seconds += time.perf_counter() - t0
        with self.amp():
            loss, _ = self.model(view1, view2)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(self.tau)
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
    contenders = [Byolkit(args, amp), Peer(args, amp, PeerBYOL)]
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
    args = p.parse_args(argv)
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
    settings.update(stem="small", byolkit_augmentation="BatchAugment(byol_views(blur=False)), CIFAR-10 mean/std",
                    byolkit_optimizer="lars", byolkit_channels_last=True,
                    peer_augmentation="byol-pytorch default (SimCLR-style torchvision transforms per batch)")
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
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
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
