"""Depth transfer on NYU Depth v2 (labelled set) with the paper's protocol: BYOL encoder against random init.

    python benchmarks/gpu_depth.py --mat nyu_depth_v2_labeled.mat --split splits.mat \\
        --encoder runs/imagenet-resnet50 --out /tmp/gpu_depth --json gpu_depth.json

The BYOL paper transfers to NYU v2 following Laina et al.: a ResNet-50 encoder, the up-projection
decoder, the berHu loss, photos at half size (240x320) with random 228x304 crops, evaluation on the
654 test images of the official split inside the Eigen crop. This script runs `python -m
trainer.depth` exactly so (the official 795 training images of the labelled file, batch 16, 40
epochs, AdamW 2e-4 with a poly decay, bf16 on the GPU) twice: once from --encoder, once from
`random:<encoder>`; only --encoder differs. The paper trained on Laina et al.'s larger set of raw
NYU frames, so its absolute numbers are not the ones to expect from 795 images; the comparison of
the two rows under one schedule is the point. `torchrun --nproc_per_node N -m trainer.depth` with
the commands recorded in the JSON spreads one run over N GPUs.

`--tiny` runs the whole script in seconds on a CPU for the test suite: generated scenes written in
NYU's .mat layout with h5py, a narrow ResNet-18 at 48 px, one epoch; an untrained saved encoder
file stands in for the BYOL one (the point is the plumbing, not the number).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_transfer, transfer_parser
from depth_scenes import METRICS, compare


def tiny_data(root: Path) -> tuple[list[str], str]:
    from trainer.checkpoint import save_encoder
    from trainer.models import build_encoder
    from trainer.sources import default_preprocessing
    from trainer.synthetic import write_nyu_like_mat
    mat, splits = write_nyu_like_mat(root / "nyu.mat", 12, 48, seed=0, train=8)
    encoder, dim = build_encoder("resnet18_w16", "imagenet")
    save_encoder(root / "encoder.safetensors", encoder, arch="resnet18_w16", stem="imagenet", embedding_dim=dim,
                 preprocessing=default_preprocessing("imagenet", 48))
    return ["--train", str(mat), "--val", str(mat), "--split", str(splits)], str(root / "encoder.safetensors")


def main(argv=None) -> int:
    p = transfer_parser(__doc__)
    p.add_argument("--mat", type=Path, help="nyu_depth_v2_labeled.mat (not needed with --tiny)")
    p.add_argument("--split", type=Path, help="NYU's splits.mat (not needed with --tiny)")
    p.add_argument("--encoder", help="the BYOL ResNet-50 (run directory or file; not needed with --tiny)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    args = p.parse_args(argv)
    tiny = (tiny_data, ["--epochs", "1", "--batch-size", "4", "--base-size", "48", "--crop-size", "40",
                        "--workers", "0", "--device", "cpu", "--draw", "1"])

    def setup() -> tuple[list[str], str, list[str]]:
        if not (args.mat and args.split and args.encoder):
            p.error("--mat, --split and --encoder are required (or --tiny)")
        data_flags = ["--train", str(args.mat), "--val", str(args.mat), "--split", str(args.split)]
        return data_flags, args.encoder, [
            "--decoder", "upproj", "--loss", "berhu", "--epochs", str(args.epochs), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--base-size", "240", "--crop-size", "228x304",
            "--max-scale", "1.5", "--eigen-crop", "on", "--max-depth", "10", "--workers", str(args.workers),
            "--eval-every", "5", "--device", "cuda"]
    return run_transfer(args, tiny, setup, compare, METRICS)


if __name__ == "__main__":
    sys.exit(main())
