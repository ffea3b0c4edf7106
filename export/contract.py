"""The deployment contract: the names every exported artefact, server and client agree on.

export.onnx writes ONNX files with these tensor names and metadata keys, export.triton writes
model repositories under DEFAULT_MODEL_NAME, serving serves exactly these names, and the
client and the app read the metadata back to know the preprocessing and the model's identity.

Imports nothing heavy, so that light clients can use it.
"""
from __future__ import annotations

import json

from trainer.preprocess import Preprocessing

DEFAULT_MODEL_NAME = "byol_encoder"

# Graph inputs. The uint8 form takes what the preprocessing contract's steps 1-3 produce
# (decoded, resized, centre-cropped RGB) and normalises inside the graph; the float form takes
# step 4's output.
INPUT_UINT8 = "images"          # uint8   [N, H, W, 3]
INPUT_FLOAT = "pixel_values"    # float32 [N, 3, H, W], normalised
OUTPUT = "embeddings"           # float32 [N, D]

# ONNX metadata_props: one key holding a JSON object, so that readers get typed values.
METADATA_KEY = "byolkit"
METADATA_FIELDS = ("arch", "stem", "embedding_dim", "head", "input", "preprocessing", "fingerprint",
                   "byolkit_version")


def encode_metadata(info: dict) -> str:
    """Model info (arch, stem, embedding_dim, head, input, preprocessing, fingerprint, ...) -> JSON."""
    out = dict(info)
    if isinstance(out.get("preprocessing"), Preprocessing):
        out["preprocessing"] = out["preprocessing"].to_dict()
    missing = [k for k in METADATA_FIELDS if k not in out]
    if missing:
        raise ValueError(f"model metadata lacks {', '.join(missing)}")
    return json.dumps(out, sort_keys=True)


def decode_metadata(text: str) -> dict:
    """The inverse of encode_metadata; `preprocessing` comes back as a Preprocessing."""
    info = json.loads(text)
    missing = [k for k in METADATA_FIELDS if k not in info]
    if missing:
        raise ValueError(f"byolkit model metadata lacks {', '.join(missing)}")
    info["preprocessing"] = Preprocessing.from_dict(info["preprocessing"])
    return info
