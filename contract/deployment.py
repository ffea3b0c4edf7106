"""The deployment contract: the names every exported artefact, server and client agree on.

export.onnx writes ONNX files with these tensor names and metadata keys, export.triton writes
model repositories under DEFAULT_MODEL_NAME, serving serves exactly these names, and the
client and the app read the metadata back to know the preprocessing and the model's identity.

Imports nothing heavy, so that light clients can use it.
"""
from __future__ import annotations

import json

from .preprocess import Preprocessing

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


# -- reading an exported file's metadata without loading its weights -----------------------------
class MetadataError(ValueError):
    """A file that is not a byolkit ONNX export (missing, truncated, foreign, or without metadata)."""


# ModelProto fields (onnx.proto): 1 ir_version (varint), 7 graph (message), 14 metadata_props (repeated
# StringStringEntryProto: 1 key, 2 value). Fields are written in field-number order, so the metadata
# sits after the graph, at the end of the file.
_IR_VERSION, _GRAPH, _METADATA_PROPS = 1, 7, 14


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise EOFError
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, pos: int, end: int):
    """(field number, wire type, value or (start, stop)) for each field of one protobuf message."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1 or wire == 5:
            value, pos = None, pos + (8 if wire == 1 else 4)
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + length), pos + length
        else:
            raise ValueError(f"wire type {wire}")
        if pos > end:
            raise EOFError
        yield field, wire, value


def read_onnx_metadata_props(path) -> dict:
    """The metadata_props of an ONNX file as {key: value}, without parsing (or holding) its graph.

    Uses only the standard library: the file is memory-mapped and its top-level protobuf fields
    walked; the graph is skipped over. Raises MetadataError for a missing, truncated or non-ONNX file.
    """
    import mmap
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise MetadataError(f"no ONNX file at {path}")
    if path.stat().st_size == 0:
        raise MetadataError(f"{path} is empty, not an ONNX model")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        seen, props = set(), {}
        try:
            for field, wire, value in _fields(buf, 0, len(buf)):
                if field in (_GRAPH, _METADATA_PROPS) and wire != 2 or field == _IR_VERSION and wire != 0:
                    raise ValueError("unexpected field type")
                seen.add(field)
                if field == _METADATA_PROPS:
                    entry = {k: bytes(buf[v[0]:v[1]]).decode("utf-8") for k, w, v in _fields(buf, *value) if w == 2}
                    props[entry.get(1, "")] = entry.get(2, "")
        except EOFError:
            raise MetadataError(f"{path} is truncated (an incomplete ONNX file)") from None
        except (ValueError, UnicodeDecodeError):
            raise MetadataError(f"{path} is not an ONNX model") from None
    if not {_IR_VERSION, _GRAPH} <= seen:
        raise MetadataError(f"{path} is not an ONNX model (no graph)")
    return props


def read_onnx_metadata(path) -> dict:
    """The byolkit metadata of an exported ONNX file (decoded: `preprocessing` is a Preprocessing).

    Cheap (the weights are not read) and free of heavy imports, for servers and clients.
    """
    props = read_onnx_metadata_props(path)
    if METADATA_KEY not in props:
        raise MetadataError(f"{path} is an ONNX model without byolkit metadata (not exported by byolkit's "
                            f"export.onnx?)")
    try:
        return decode_metadata(props[METADATA_KEY])
    except (ValueError, TypeError, KeyError) as e:
        raise MetadataError(f"{path}: unreadable byolkit metadata ({e})") from None
