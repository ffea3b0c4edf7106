"""Static int8 quantisation of an export, refused unless its neighbours agree with the float model's.

    python -m export.onnx --checkpoint model.onnx --out model-int8.onnx --int8 --calibration photos/
    python -m export.onnx --checkpoint runs/c10 --out model-int8.onnx --int8 --calibration cifar10:test

The source is a float32 export (a byolkit .onnx file) or anything export.onnx exports from (a run
directory, checkpoint, encoder file), which is exported and verified first. The calibration images
(a folder, zip or torchvision data set, read by trainer.data as the trainer reads them) are split
once, by a seeded permutation, into two disjoint parts:

  calibration  the activations' ranges are measured on these (ONNX Runtime's quantisation tools:
               QDQ format, int8 weights per output channel, uint8 activations, the layout ONNX
               Runtime's CPU kernels run fastest with VNNI);
  held back    never calibrated on: both models embed them, and the guard compares.

The guard reports the cosine between each held-back image's float32 and int8 embeddings (mean and
minimum) and recall@10 of the int8 neighbours against the float32 neighbours (each held-back image
a query, the others the gallery). Below --min-recall (default 0.95) nothing is written. The figure
is for a gallery of --held-back images: in a larger gallery neighbours are closer together and more
of them swap (cpu-quick on CIFAR-10: 0.96 among 256 images, 0.92 among 10,000; BENCHMARKS.md). The figures go
into the file's byolkit metadata under "quantization"; the fingerprint is the int8 file's own, and
"float_fingerprint" names the float model it came from.

Kept in float32, and so exact: the in-graph preprocessing (uint8 -> normalised NCHW, every node
before the first convolution; the guard checks that its output is bit-identical to the float
model's) and the head after global pooling (pooling, flatten, projector: <1% of the work, and a
float average of the last block keeps the embedding's resolution finer than 8 bits).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from contract.deployment import INPUT_UINT8, METADATA_KEY, OUTPUT, encode_metadata, read_onnx_metadata

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "percentile"        # measured against minmax and entropy: BENCHMARKS.md, "int8"
DEFAULT_CALIBRATION_IMAGES = 256
DEFAULT_HELD_BACK = 256
DEFAULT_MIN_RECALL = 0.95
GUARD_K = 10
SPLIT_SEED = 0
CALIBRATION_BATCH = 8                # images per calibration run: bounds the memory the histograms need


class QuantizationError(ValueError):
    """Bad input to an int8 export, or a quantised model the guard refuses: one `error:` line, exit 2."""


# ---------------------------------------------------------------------------------------------
# Which images calibrate and which are held back
# ---------------------------------------------------------------------------------------------
def split_calibration(n: int, calibration: int = DEFAULT_CALIBRATION_IMAGES, held_back: int = DEFAULT_HELD_BACK,
                      seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """-> (calibration indices, held-back indices): disjoint, deterministic for (n, counts, seed).

    A seeded permutation of range(n): its first `held_back` entries are held back, the next
    `calibration` calibrate. A collection smaller than both together is shared out in the same
    proportion, keeping at least GUARD_K + 1 held back (recall@10 needs ten neighbours)."""
    if calibration < 1 or held_back < GUARD_K + 1:
        raise QuantizationError(f"need at least 1 calibration image and {GUARD_K + 1} held back, "
                                f"got {calibration} and {held_back}")
    if n < calibration + held_back:
        held_back = max(GUARD_K + 1, n * held_back // (calibration + held_back))
        calibration = n - held_back
    if calibration < 1:
        raise QuantizationError(f"{n} images are too few: the guard holds back {GUARD_K + 1} and calibration "
                                "needs more besides")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held_back:held_back + calibration]), np.sort(order[:held_back])


def load_pixels(collection, indices, pre, workers: int = 2) -> np.ndarray:
    """The images at `indices`, through the preprocessing contract's steps 1-3 -> uint8 [N, S, S, 3];
    unreadable ones are left out."""
    from contract.preprocess import ImageDecodeError

    def one(i):
        try:
            return pre.resize_and_crop(collection.load(int(i)))
        except ImageDecodeError:
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        pixels = [p for p in pool.map(one, indices) if p is not None]
    s = pre.input_size
    return np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.uint8)


class _Batches:
    """ONNX Runtime's CalibrationDataReader over a uint8 image array, one batch per item; set_range lets
    quantize_static collect (and free) the activations a batch at a time (CalibStridedMinMax)."""

    def __init__(self, feed, input_name: str, batch: int = CALIBRATION_BATCH):
        self.items = [{input_name: feed[i:i + batch]} for i in range(0, len(feed), batch)]
        self.set_range(0, len(self.items))

    def __len__(self):
        return len(self.items)

    def set_range(self, start_index: int, end_index: int):
        self._it = iter(self.items[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


# ---------------------------------------------------------------------------------------------
# The graph: what stays float
# ---------------------------------------------------------------------------------------------
def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def preprocessing_nodes(model) -> tuple[list[str], str | None]:
    """(names of the nodes computing the first convolution's input from the graph input, that tensor's name).

    In a uint8 export these are the contract's scaling, normalisation and NHWC -> NCHW; in a float
    export there are none."""
    graph = model.graph
    first = next((n for n in graph.node if n.op_type == "Conv"), None)
    if first is None:
        return [], None
    producers, names, stack = _producers(graph), [], [first.input[0]]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and node.name not in names:
            names.append(node.name)
            stack.extend(node.input)
    return names, first.input[0]


def head_nodes(model) -> list[str]:
    """Names of the global pooling node(s) and every node after them (flatten, projector)."""
    graph = model.graph
    pools = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if not pools:
        return []
    consumers: dict = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    names, stack = [], list(pools)
    while stack:
        node = stack.pop()
        if node.name not in names:
            names.append(node.name)
            stack.extend(c for out in node.output for c in consumers.get(out, []))
    return names


def _name_nodes(model) -> None:
    """Give every node a unique name (quantize_static excludes nodes by name)."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def quantize(float_model, out_path, calibration_feed: np.ndarray, input_name: str, method: str = DEFAULT_METHOD):
    """quantize_static (QDQ, per-channel int8 weights, uint8 activations) of `float_model` (a ModelProto
    with named nodes) calibrated on `calibration_feed` -> (the excluded preprocessing nodes, their output
    tensor's name)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    pre_nodes, pre_output = preprocessing_nodes(float_model)
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                 "percentile": CalibrationMethod.Percentile}[method]
    logger = logging.getLogger()  # quantize_static logs its progress on the root logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    src = Path(out_path).with_name("float-named.onnx")
    onnx.save_model(float_model, src)  # a path: quantize_static turns a ModelProto's weights into external data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(src, str(out_path), _Batches(calibration_feed, input_name),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calibrate,
                            nodes_to_exclude=pre_nodes + head_nodes(float_model),
                            extra_options={"CalibStridedMinMax": 1, "CalibPercentile": 99.999})
    finally:
        logger.setLevel(level)
        src.unlink(missing_ok=True)
    return pre_nodes, pre_output


# ---------------------------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------------------------
def neighbours(x: np.ndarray, k: int = GUARD_K, chunk: int = 1024) -> np.ndarray:
    """Each row's k nearest other rows by cosine -> int [N, k] (itself excluded), `chunk` rows at a time."""
    x = x.astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    out = np.empty((len(x), k), np.int64)
    for start in range(0, len(x), chunk):
        sims = x[start:start + chunk] @ x.T
        rows = np.arange(len(sims))
        sims[rows, start + rows] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[start:start + chunk] = np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1)
    return out


def agreement(float_emb: np.ndarray, int8_emb: np.ndarray, k: int = GUARD_K) -> dict:
    """Cosine per image between the two models' embeddings, and recall@k of the int8 model's neighbours
    (among the same images) against the float model's."""
    a, b = float_emb.astype(np.float64), int8_emb.astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)
    truth, got = neighbours(a, k), neighbours(b, k)
    recall = (truth[:, :, None] == got[:, None, :]).any(2).mean(1)
    return {"images": len(a), "k": k, f"recall_at_{k}": round(float(recall.mean()), 4),
            f"recall_at_{k}_min": round(float(recall.min()), 4),
            "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5)}


def _session(model_or_path, threads: int = 0):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def embed(session, input_name: str, feed: np.ndarray, batch: int = 32, outputs=(OUTPUT,)) -> list[np.ndarray]:
    parts = [session.run(list(outputs), {input_name: feed[i:i + batch]}) for i in range(0, len(feed), batch)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(outputs))]


def _with_output(model, tensor: str):
    """A copy of `model` that also returns `tensor` (float32, shape left open)."""
    import onnx
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return out


def int8_fingerprint(model, float_fingerprint: str) -> str:
    """The int8 file's own fingerprint: its initialisers (weights, scales, zero points) and its source's."""
    h = hashlib.sha256(f"int8:{float_fingerprint}".encode())
    for t in sorted(model.graph.initializer, key=lambda t: t.name):
        h.update(t.name.encode())
        h.update(t.SerializeToString())
    return h.hexdigest()[:16]


def int8_instructions() -> dict:
    """The CPU's int8 dot-product instructions as /proc/cpuinfo lists them (reported, never required:
    without VNNI the int8 file still runs, with less gain)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {f: f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8", "avx2")}


# ---------------------------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------------------------
def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        import sys
        print(msg, file=sys.stderr, flush=True)


def export_int8(source, out_path, calibration, *, method: str = DEFAULT_METHOD,
                calibration_images: int = DEFAULT_CALIBRATION_IMAGES, held_back: int = DEFAULT_HELD_BACK,
                min_recall: float = DEFAULT_MIN_RECALL, seed: int = SPLIT_SEED, overwrite: bool = False,
                quiet: bool = True, **float_options) -> dict:
    """Quantise `source` (a float32 byolkit .onnx file, or anything export.onnx exports from, with
    `float_options` for that export) to int8, calibrated on `calibration` (folder, zip or data set),
    and write it to `out_path` only if the guard passes. Returns a JSON-able report.

    Raises QuantizationError (bad input or refused by the guard) and export.onnx's errors; in every
    case nothing is left at out_path.
    """
    import time

    import onnx

    from trainer import __version__
    from trainer.checkpoint import atomic_write
    from trainer.data import open_collection

    from .onnx import ExportError, export_onnx

    t0 = time.perf_counter()
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise ExportError(f"--out should end in .onnx, got {out.name}")
    if out.is_dir():
        raise ExportError(f"{out} is a directory; --out names the .onnx file to write")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass --overwrite")
    if not 0 <= min_recall <= 1:
        raise QuantizationError(f"--min-recall must be in [0, 1], got {min_recall}")
    if method not in CALIBRATION_METHODS:
        raise QuantizationError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if calibration is None:
        raise QuantizationError("--int8 needs --calibration IMAGES (a folder, zip archive or data set name)")
    collection = open_collection(str(calibration))  # bad paths fail before any export work
    split_calibration(len(collection), calibration_images, held_back, seed)

    with tempfile.TemporaryDirectory(prefix="byolkit-int8-") as tmp:
        src = Path(str(source))
        if src.suffix == ".onnx" and src.is_file():
            float_path, float_report = src, None
            if float_options.get("head", "encoder") != "encoder" or float_options.get("input_kind", "uint8") != "uint8":
                raise QuantizationError("--head and --input describe a new export; an .onnx source keeps its own")
        else:
            float_path = Path(tmp) / "float.onnx"
            _log(f"exporting the float32 model from {source} first", quiet)
            float_report = export_onnx(source, float_path, quiet=quiet, **float_options)
        meta = read_onnx_metadata(float_path)
        if meta.get("weights", "float32") != "float32":
            raise QuantizationError(f"{float_path} has {meta.get('weights')} weights; int8 is made from a float32 "
                                    "export")
        pre = meta["preprocessing"]
        input_name = meta.get("input_name", INPUT_UINT8)

        calib_idx, held_idx = split_calibration(len(collection), calibration_images, held_back, seed)
        _log(f"reading {len(calib_idx)} calibration and {len(held_idx)} held-back images of {calibration}", quiet)
        calib_px, held_px = load_pixels(collection, calib_idx, pre), load_pixels(collection, held_idx, pre)
        if len(calib_px) == 0 or len(held_px) < GUARD_K + 1:
            raise QuantizationError(f"{calibration}: too few readable images ({len(calib_px)} for calibration, "
                                    f"{len(held_px)} held back; need 1 and {GUARD_K + 1})")

        def feed(px):
            return px if input_name == INPUT_UINT8 else pre.normalize(px)

        float_model = onnx.load(float_path)
        _name_nodes(float_model)
        q_path = Path(tmp) / "int8.onnx"
        _log(f"quantising to int8 ({method} calibration on {len(calib_px)} images)", quiet)
        t_q = time.perf_counter()
        pre_nodes, pre_output = quantize(float_model, q_path, feed(calib_px), input_name, method)
        t_q = time.perf_counter() - t_q
        q_model = onnx.load(q_path)

        _log(f"guard: {len(held_px)} held-back images through both models", quiet)
        outputs = (OUTPUT, pre_output) if pre_nodes else (OUTPUT,)
        f_sess = _session(_with_output(float_model, pre_output) if pre_nodes else float_model)
        q_sess = _session(_with_output(q_model, pre_output) if pre_nodes else q_model)
        f_out, q_out = embed(f_sess, input_name, feed(held_px), outputs=outputs), \
            embed(q_sess, input_name, feed(held_px), outputs=outputs)
        guard = agreement(f_out[0], q_out[0])
        guard["preprocessing_identical"] = bool(np.array_equal(f_out[1], q_out[1])) if pre_nodes else None
        guard["min_recall"] = min_recall
        guard["passed"] = bool(guard[f"recall_at_{GUARD_K}"] >= min_recall and np.isfinite(q_out[0]).all()
                               and guard["preprocessing_identical"] is not False)
        del f_sess, q_sess
        if not guard["passed"]:
            why = (f"recall@{GUARD_K} of int8 neighbours against float32 is {guard[f'recall_at_{GUARD_K}']:.3f}, "
                   f"below --min-recall {min_recall}" if guard[f"recall_at_{GUARD_K}"] < min_recall else
                   "the int8 model's preprocessing differs from the float model's" if not
                   guard["preprocessing_identical"] else "the int8 model gives non-finite embeddings")
            raise QuantizationError(f"int8 model refused, nothing written: {why} (cosine mean "
                                    f"{guard['cosine_mean']:.4f}, min {guard['cosine_min']:.4f}, on {len(held_px)} "
                                    f"held-back images of {calibration})")

        q_meta = {k: v for k, v in meta.items()}
        q_meta.update(weights="int8", float_fingerprint=meta["fingerprint"],
                      fingerprint=int8_fingerprint(q_model, meta["fingerprint"]), byolkit_version=__version__,
                      opset=next((o.version for o in q_model.opset_import if o.domain in ("", "ai.onnx")), None))
        q_meta["quantization"] = {
            "format": "QDQ", "weights": "int8 per channel", "activations": "uint8",
            "method": method, "float_fingerprint": meta["fingerprint"],
            "calibration": {"source": str(calibration), "images": len(calib_px), "seed": seed},
            "kept_float": {"preprocessing_nodes": len(pre_nodes), "head_nodes": len(head_nodes(float_model))},
            "guard": {**guard, "held_back": len(held_px)},
        }
        del q_model.metadata_props[:]
        onnx.helper.set_model_props(q_model, {METADATA_KEY: encode_metadata(q_meta)})
        q_model.producer_name, q_model.producer_version = "byolkit", __version__
        q_model.doc_string = f"byolkit BYOL {meta['head']} (int8 of {meta['fingerprint']}): {meta['arch']}"

        def write(tmp_out: str) -> None:
            onnx.save_model(q_model, tmp_out)
            try:
                onnx.checker.check_model(tmp_out)
            except onnx.checker.ValidationError as e:
                raise QuantizationError(f"the ONNX checker rejects the int8 graph: {e}") from None

        atomic_write(out, write)
        float_size = float_path.stat().st_size
    size = out.stat().st_size
    return {"onnx": str(out), "source": str(source), "size_bytes": size, "float_size_bytes": float_size,
            "size_ratio": round(float_size / size, 2), "metadata": {**q_meta, "preprocessing": pre.to_dict()},
            "guard": guard, "float_export": float_report,
            "seconds": {"quantize": round(t_q, 2), "total": round(time.perf_counter() - t0, 2)}}
