"""byolkit app: similar-image search over embeddings (FAISS index, command line, Gradio page, main job).

Needs the `app` extra: pip install -e '.[app]'.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys

MAX_UPLOAD_BYTES = 25 * 2**20  # the largest file a visitor of the page may upload (a large photo is a few MB)

# import name -> what it is for, checked before work starts so that a missing extra is one clear line
NEEDS = {"faiss": "the index (faiss-cpu)", "onnxruntime": "in-process embedding (onnxruntime)",
         "gradio": "the page (gradio)", "onnx": "the main job's export (onnx)",
         "onnxscript": "the main job's export (onnxscript)", "tritonclient": "a --server encoder (tritonclient)",
         "matplotlib": "the main job's training curve (matplotlib)",
         "pyarrow": "Parquet embedding shards (pyarrow)", "ray": "the Ray engine (ray[data])",
         "qdrant_client": "the Qdrant backend (qdrant-client)"}
SCALE = ("pyarrow", "ray", "qdrant_client")  # the `scale` extra's; the rest are the `app` extra's


def missing(*modules: str) -> str | None:
    """None when every module imports, else a one-line message naming the missing ones and the fix."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extras = ",".join(sorted({"scale" if m in SCALE else "app" for m in absent}))
    return (f"missing {', '.join(NEEDS.get(m, m) for m in absent)}: install the {extras} extra, "
            f"pip install -e '.[{extras}]'")


class CommandParser(argparse.ArgumentParser):
    """The app's commands' parser: bad input prints the usage, then one `error: ...` line, exit status 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
