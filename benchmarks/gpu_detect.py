"""The longer detection schedule, for a GPU: BYOL-initialised against randomly initialised backbone.

    python benchmarks/gpu_detect.py --encoder runs/byol_r50 --coco /data/coco --out runs/gpu_detect \\
        --json benchmarks/results/gpu_detect.json
    torchrun --nproc_per_node 8 benchmarks/gpu_detect.py ...   # not needed: pass --gpus 8 instead
    python benchmarks/gpu_detect.py --tiny --out /tmp/gpu_detect_tiny   # a 1-minute CPU rehearsal

--coco is a folder with images/{train2017,val2017} and annotations/instances_{train2017,val2017}.json
(the full COCO 2017 or the shared coco256). The schedule is the detection references' 2x one,
shortened to --epochs (default 24): 640-1066 px, batch 16 (2 per GPU), LR 0.02 x batch/16, warmup 500
steps, x0.1 at 2/3 and 8/9, all stages trained with synchronised BatchNorm over --gpus processes
(torchrun), as in the paper's and MoCo's transfer protocol. Each run is a `python -m trainer.detect`
(or torchrun) with the same flags; both runs' COCO mAP / AP50 go to --json.

--tiny swaps the data for generated shapes (trainer.synthetic.write_shapes_coco), the encoder for
an untrained resnet18_w16 file and the schedule for one epoch at 64 px on the CPU: the test suite runs it so
that this script keeps working where no GPU is around.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # puts the repository root on sys.path
from downstream_coco import detection


def gpu_schedule(epochs: int, gpus: int) -> list[str]:
    batch = 2 * gpus
    return ["--epochs", str(epochs), "--batch-size", str(batch), "--lr", str(0.02 * batch / 16),
            "--warmup-steps", "500", "--min-size", "640", "--max-size", "1066",
            "--trainable-layers", "5", "--norm", "sync" if gpus > 1 else "bn", "--device", "cuda", "--workers", "4"]


TINY_SCHEDULE = ["--epochs", "1", "--batch-size", "4", "--lr", "0.01", "--warmup-steps", "2", "--min-size", "64",
                 "--max-size", "64", "--anchor-sizes", "8,16,32,64,128", "--head-size", "64", "--rois-per-image", "32",
                 "--trainable-layers", "5", "--norm", "bn", "--device", "cpu", "--workers", "0"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", help="the BYOL encoder (required unless --tiny)")
    p.add_argument("--coco", help="COCO-layout folder (required unless --tiny)")
    p.add_argument("--out", required=True, help="scratch folder for the runs")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--epochs", type=int, default=24)
    p.add_argument("--gpus", type=int, default=1, help="processes (one per GPU) for each run, through torchrun")
    p.add_argument("--tiny", action="store_true", help="generated data, CPU, one short epoch")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.tiny:
        from trainer.synthetic import write_shapes_coco
        coco = out / "shapes"
        for split, count, seed in (("train2017", 16, 0), ("val2017", 8, 1)):
            images, ann = write_shapes_coco(coco / split, count, 64, seed, masks=False)
            (coco / "images").mkdir(parents=True, exist_ok=True)
            (coco / "annotations").mkdir(parents=True, exist_ok=True)
            images.replace(coco / "images" / split)
            ann.replace(coco / "annotations" / f"instances_{split}.json")
        # a saved (untrained) encoder file, so that both the file and the random:PATH routes run
        from trainer.checkpoint import save_encoder
        from trainer.models import build_encoder
        from trainer.sources import default_preprocessing
        net, dim = build_encoder("resnet18_w16")
        encoder = str(out / "tiny_encoder.safetensors")
        save_encoder(Path(encoder), net, arch="resnet18_w16", stem="imagenet", embedding_dim=dim,
                     preprocessing=default_preprocessing("imagenet", 64))
        schedule = TINY_SCHEDULE
    else:
        if not args.encoder or not args.coco:
            p.error("--encoder and --coco are required (or --tiny)")
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device here; this is the GPU schedule (use --tiny for a CPU rehearsal, or "
                    "benchmarks/downstream_coco.py for the short CPU one)")
        coco, encoder, schedule = Path(args.coco), args.encoder, gpu_schedule(args.epochs, args.gpus)
    launcher = None if args.tiny or args.gpus == 1 else ["torch.distributed.run", f"--nproc_per_node={args.gpus}"]
    result = {"machine": machine(), "tiny": args.tiny,
              "detection": detection(encoder, coco, out, schedule, launcher=launcher)}
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
