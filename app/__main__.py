"""python -m app: the similar-image search page.

    python -m app                                   # the main job on the photos shipped with byolkit:
                                                    # train briefly, export, index, open the page
    python -m app --train-time 10m                  # ... and train the same encoder on, to 10 minutes in all
    python -m app --images ~/Pictures               # the same on your own pictures
    python -m app --index INDEX_DIR --model model.onnx         # serve an index built with python -m app.index
    python -m app --index INDEX_DIR --server grpc://host:8001  # ... embedding with a byolkit server
    python -m app --index INDEX_DIR --model model.onnx --backend qdrant --qdrant-url http://127.0.0.1:6333
"""
from __future__ import annotations

import argparse
import re
import sys

from contract.deployment import DEFAULT_MODEL_NAME
from contract.preprocess import MAX_PIXELS

from . import MAX_UPLOAD_BYTES, CommandParser


def get_args_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m app", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    serve = p.add_argument_group("serving an existing index")
    serve.add_argument("--index", help="index directory (python -m app.index build); without it, the main job runs")
    serve.add_argument("--examples", metavar="DIR", help="example query images shown on the page: up to 12 image "
                       "files of DIR (not its sub-folders), copied (default: a few images of the index)")
    enc = p.add_argument_group("encoder (with --index: one of them is required; without: skips the training)")
    enc.add_argument("--model", metavar="MODEL.onnx", help="an exported encoder, run in this process")
    enc.add_argument("--server", metavar="URL", help="a byolkit server: grpc://host:8001 or http://host:8000")
    enc.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the served model's name (default %(default)s)")
    job = p.add_argument_group("the main job (without --index)")
    job.add_argument("--images", metavar="DIR|ZIP", help="your images: a folder (sub-folders name classes) or a zip "
                     "archive (default: the shipped flower photos, app/data/flowers.zip)")
    job.add_argument("--work", default="runs/quickstart", help="working folder; each image collection gets "
                     "its own sub-folder (default %(default)s)")
    job.add_argument("--work-exact", action="store_true", help="use --work itself, not a sub-folder per collection")
    job.add_argument("--train-time", default="3m", help="training time in all (default %(default)s); longer than "
                     "an earlier run's, the encoder it trained is trained on for the difference")
    job.add_argument("--train-steps", type=int, default=0, help="train for this many steps in all instead of "
                     "--train-time")
    job.add_argument("--retrain", action="store_true", help="train a new encoder even if one was trained before")
    job.add_argument("--no-compare", dest="compare", action="store_false",
                     help="skip measuring precision@10 against random initialisation and normalised pixels")
    job.add_argument("--no-app", action="store_true", help="prepare everything, print a JSON summary, and exit")
    job.add_argument("--no-progress", action="store_true", help="no progress bars")
    from .backend import add_flags
    add_flags(p)
    page = p.add_argument_group("the page")
    page.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; "
                      "0.0.0.0 for every interface)")
    page.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    page.add_argument("-k", type=int, default=10, help="neighbours shown at first (default %(default)s)")
    page.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / 2**20,
                      help="largest file a visitor may upload, in MiB (default %(default)g)")
    page.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                      help="largest image accepted, in pixels, checked before decoding (default %(default)s)")
    return p


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.k <= 100:
        parser.error("-k must be between 1 and 100")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.max_upload_mb <= 0 or args.max_pixels < 1:
        parser.error("--max-upload-mb and --max-pixels must be positive")
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[smhSMH]?\s*", args.train_time) or float(
            re.sub(r"[^\d.]", "", args.train_time)) <= 0:
        parser.error(f"--train-time: not a duration: {args.train_time!r} (use e.g. 90s, 2m, 1h)")
    if args.train_steps < 0:
        parser.error("--train-steps must be 0 or more")
    if args.model and args.server:
        parser.error("give the encoder as either --model or --server, not both")
    from .backend import Backend
    backend = Backend.from_args(args)
    if backend.problem():
        parser.error(backend.problem())
    if backend.name != "faiss" and args.index is None:
        parser.error("--backend qdrant serves an index built with python -m app.index build --backend qdrant: "
                     "give --index")
    from . import missing
    needed = ["faiss", "onnxruntime" if args.model or not args.server else "tritonclient"]
    needed += [] if args.no_app else ["gradio"]
    needed += ["qdrant_client"] if backend.name == "qdrant" else []
    needed += ["onnx", "onnxscript", "matplotlib"] if args.index is None and not (args.model or args.server) else []
    problem = missing(*needed)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.index is None:
        from .quickstart import run
        return run(args)
    if args.images:
        parser.error("--images is for the main job; to add images to an index use python -m app.index add "
                     "(or the Index tab of the page)")
    if not (args.model or args.server):
        parser.error("--index needs the encoder it was built with: --model MODEL.onnx or --server URL")
    return serve(args, backend)


def serve(args, backend) -> int:
    from pathlib import Path

    from .embedding import open_encoder
    from .ops import USER_ERRORS, AppError
    from .ui import AppState, launch
    try:
        index = backend.open(args.index)
        encoder = open_encoder(args.model, args.server, args.model_name)
        index.check_model(encoder.model)
        limits = {"max_pixels": args.max_pixels, "max_upload_bytes": int(args.max_upload_mb * 2**20)}
        if args.examples:  # the app serves copies of the image files, never the folder itself
            folder = Path(args.examples)
            if not folder.is_dir():
                raise AppError(f"--examples {folder} is not a folder")
            state = AppState(index, encoder, k=args.k, examples=sorted(folder.iterdir()), **limits)
            if not state.examples:
                state.close()
                raise AppError(f"--examples {folder} holds no image files that can be used (at most 10 MB and "
                               f"{args.max_pixels} pixels each)")
        else:  # a few images of the index, copied out of it (it may be a zip)
            import tempfile
            from functools import partial

            from .quickstart import sample_examples
            with tempfile.TemporaryDirectory(prefix="byolkit-examples-") as folder:
                sample = index.sample_examples if backend.name == "qdrant" else partial(sample_examples, index)
                state = AppState(index, encoder, k=args.k, examples=sample(Path(folder)), **limits)
    except USER_ERRORS + (AppError,) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(state, host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
