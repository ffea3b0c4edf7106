"""Similar-image search from the command line: build an index of a folder, add to it, query it.

    python -m app.index build  --images DIR|ZIP --out INDEX_DIR --model model.onnx
    python -m app.index add    --index INDEX_DIR --images DIR|ZIP --model model.onnx
    python -m app.index search --index INDEX_DIR --image FILE -k 10 --model model.onnx
    python -m app.index info   --index INDEX_DIR
    python -m app.index build  --embeddings EMB_DIR --out INDEX_DIR   # shards of python -m app.embed

Every command takes --backend qdrant with --qdrant-url URL (a server) or --qdrant-path DIR (local
mode): the index is then a Qdrant collection named after INDEX_DIR (app/backend.py).

The encoder is an exported ONNX file run in process (--model) or a byolkit server
(--server grpc://host:8001 or http://host:8000). Similarity is cosine. Collections up to 50,000
images get exact search; larger ones an approximate index (HNSW, or IVF-PQ beyond 500,000), tuned to
recall@10 >= --target-recall against exact search; --index-type picks one by name.
An index refuses embeddings of any other model than the one it was built with.
One writer at a time: `build` and `add` on an index another process is changing stop with an
error (exit status 1), or wait for it with --wait.
"""
from __future__ import annotations

import argparse
import json
import sys

from contract.deployment import DEFAULT_MODEL_NAME

from . import CommandParser
from .backend import Backend
from .backend import add_flags as add_backend_flags
from .faiss_index import DEFAULT_TARGET_RECALL, KINDS


def _encoder_flags(p):
    g = p.add_argument_group("encoder (one of)")
    g.add_argument("--model", metavar="MODEL.onnx", help="an exported encoder, run in this process")
    g.add_argument("--server", metavar="URL", help="a byolkit server: grpc://host:8001 or http://host:8000")
    g.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="the served model's name (default %(default)s)")
    g.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads in process (0: all cores)")


def get_args_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m app.index", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser, required=True)

    b = sub.add_parser("build", help="embed a folder or zip of images and write a new index",
                       description="Embed every readable image of --images and write a new index to --out.")
    b.add_argument("--images", help="image folder (sub-folders name classes), zip archive of one, "
                   "or a torchvision data set (cifar10:test)")
    b.add_argument("--embeddings", metavar="EMB_DIR", help="instead of --images: the Parquet shards written by "
                   "python -m app.embed, indexed one shard in memory at a time (no encoder needed)")
    b.add_argument("--out", required=True, help="index directory (created; must be new unless --force)")
    b.add_argument("--index-type", default="auto", choices=KINDS,
                   help="exact (flat) or approximate (hnsw, ivfpq); auto chooses by size (default)")
    b.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL,
                   help="recall@10 an approximate index is tuned to, against exact search (default %(default)s)")
    b.add_argument("--force", action="store_true", help="replace an existing index in --out")
    _common(b)

    a = sub.add_parser("add", help="append images to an existing index",
                       description="Embed the images of --images not yet in the index and append them.")
    a.add_argument("--index", required=True, help="index directory")
    a.add_argument("--images", required=True, help="image folder, zip archive or torchvision data set")
    _common(a)

    s = sub.add_parser("search", help="print the nearest neighbours of an image",
                       description="Print the k indexed images most similar to --image, with cosine similarity.")
    s.add_argument("--index", required=True, help="index directory")
    s.add_argument("--image", required=True, help="the query image file")
    s.add_argument("-k", type=int, default=10, help="neighbours to print (default %(default)s)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _encoder_flags(s)

    i = sub.add_parser("info", help="describe an index", description="Print what an index holds, as JSON.")
    i.add_argument("--index", required=True, help="index directory")
    for sp in (b, a, s, i):
        add_backend_flags(sp)
    return p


def _common(p):
    _encoder_flags(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per request to the encoder (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--wait", action="store_true", help="if another process is changing the index, wait for it "
                   "to finish (default: stop with an error)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report_skipped(skipped) -> None:
    for name, reason in skipped[:5]:
        _log(f"  skipped {name}: {reason}")
    if len(skipped) > 5:
        _log(f"  ... and {len(skipped) - 5} more unreadable images")


def main(argv=None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if getattr(args, "k", 1) < 1:
        parser.error("-k must be at least 1")
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    if not 0 < getattr(args, "target_recall", 0.5) <= 1:
        parser.error("--target-recall must be in (0, 1]")
    backend = Backend.from_args(args)
    if backend.problem():
        parser.error(backend.problem())
    from_shards = args.command == "build" and args.embeddings
    if args.command == "build" and bool(args.images) == bool(args.embeddings):
        parser.error("give the images as either --images DIR|ZIP or --embeddings EMB_DIR")
    if args.command != "info" and not from_shards and bool(args.model) == bool(args.server):
        parser.error("give the encoder as either --model MODEL.onnx or --server URL")
    if from_shards and args.model and args.server:
        parser.error("give the encoder (optional with --embeddings) as either --model or --server")
    from . import missing
    model, server = getattr(args, "model", None), getattr(args, "server", None)
    encoder_module = ["onnxruntime"] if model else ["tritonclient"] if server else []
    problem = missing("faiss", *([] if args.command == "info" else encoder_module),
                      *(["qdrant_client"] if backend.name == "qdrant" else []), *(["pyarrow"] if from_shards else []))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    from . import backend as backends
    from . import ops
    from .embed import EmbedError
    from .embedding import open_encoder
    from .faiss_index import IndexBusyError

    try:
        if args.command == "info":
            print(json.dumps(backend.open(args.index).info(), indent=1))
            return 0
        if args.command == "build":
            if backend.name == "faiss":
                ops.check_build_target(args.out, args.force)
            if args.images:
                ops.open_images(args.images)  # bad paths fail here, before the model loads
        index = backend.open(args.index) if args.command in ("add", "search") else None
        encoder = open_encoder(args.model, args.server, args.model_name, threads=args.threads) \
            if args.model or args.server else None
        if index is not None:
            index.check_model(encoder.model)

        if from_shards:
            index = backends.build_from_embeddings(backend, args.embeddings, args.out, kind=args.index_type,
                                                   target_recall=args.target_recall, force=args.force,
                                                   model=encoder.model if encoder else None, log=_log)
            print(f"indexed {len(index)} embeddings from {args.embeddings} into {args.out}: {_describe(index)}")
        elif args.command == "build":
            extra = {"kind": args.index_type, "target_recall": args.target_recall, "wait": args.wait} \
                if backend.name == "faiss" else {}
            index, report = backends.build(backend, encoder, args.images, args.out, batch_size=args.batch_size,
                                           force=args.force, progress=not args.no_progress, log=_log, **extra)
            _report_skipped(report.skipped)
            print(f"indexed {len(index)} images from {args.images} into {args.out} "
                  f"({len(report.skipped)} unreadable skipped): {_describe(index)}")
        elif args.command == "add":
            report = ops.add_collection(index, encoder, args.images, batch_size=args.batch_size,
                                        progress=not args.no_progress, log=_log, wait=args.wait)
            _report_skipped(report.skipped)
            print(f"{report.line()}; the index holds {len(index)} images: {_describe(index)}")
        else:
            hits = ops.query(index, encoder, args.image, args.k)
            if args.json:
                print(json.dumps([{k: h[k] for k in ("rank", "score", "label", "path")} for h in hits], indent=1))
            else:
                print(f"{'rank':>4}  {'similarity':>10}  {'label':<12}  path")
                for h in hits:
                    print(f"{h['rank']:>4}  {h['score']:>10.4f}  {(h['label'] or '-'):<12}  {h['path']}")
        return 0
    except IndexBusyError as e:  # not bad input: the same command works once the other writer is done
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ops.USER_ERRORS + (ops.AppError, EmbedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _describe(index) -> str:
    recall = index.recall or {}
    quality = "exact search" if index.kind == "flat" else "Qdrant, cosine" if index.kind == "qdrant" else (
        f"recall@10 {recall['value']} against exact (target {recall['target']})" if recall.get("value") is not None
        else "too few images to measure recall: searching exhaustively")
    model = index.model
    guard = (model.get("quantization") or {}).get("guard")
    int8 = f" (int8: recall@10 {guard['recall_at_10']} against float32 neighbours)" if guard else ""
    return (f"{index.kind} index, {quality}; model {model.get('arch', '?')} {model.get('embedding_dim')}-d{int8}, "
            f"fingerprint {model.get('fingerprint')}")


if __name__ == "__main__":
    sys.exit(main())
