"""Helpers for the app and index tests: a tiny stand-in encoder as a real ONNX file.

The stand-in honours the deployment contract (contract.deployment): uint8 input `images` [N, S, S, 3],
output `embeddings` [N, D], and the byolkit metadata with a fingerprint. Its embedding is a fixed
linear map of the image's mean colour, so that the conftest images (classes told apart by colour)
have a meaningful nearest-neighbour structure, and it runs in microseconds.
"""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np

from contract.deployment import INPUT_UINT8, METADATA_KEY, OUTPUT, encode_metadata
from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocessing

SIZE, DIM = 16, 16


def make_colour_model(path: Path, seed: int = 0, dim: int = DIM, size: int = SIZE) -> Path:
    """Write the stand-in encoder; a different `seed` makes a different model (another fingerprint)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((6, dim)).astype(np.float32)
    bias = rng.standard_normal(dim).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("Cast", [INPUT_UINT8], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["unit"]),
        helper.make_node("ReduceMean", ["unit", "hw"], ["mean"], keepdims=0),        # [N, 3]
        helper.make_node("Sub", ["mean", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["square"]),
        helper.make_node("Concat", ["centred", "square"], ["features"], axis=1),   # [N, 6]
        helper.make_node("MatMul", ["features", "w"], ["projected"]),
        helper.make_node("Add", ["projected", "b"], [OUTPUT]),
    ]
    inits = [numpy_helper.from_array(np.array(255.0, np.float32), "c255"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "hw"),
             numpy_helper.from_array(np.full(3, 0.5, np.float32), "half"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph(
        nodes, "colour_encoder",
        [helper.make_tensor_value_info(INPUT_UINT8, TensorProto.UINT8, ["batch", size, size, 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"arch": "colour-mean", "stem": "none", "embedding_dim": dim, "head": "encoder", "input": "uint8",
            "preprocessing": Preprocessing(size, size, CIFAR10_MEAN, CIFAR10_STD),
            "fingerprint": f"colour{seed:010d}", "byolkit_version": "test"}
    helper.set_model_props(model, {METADATA_KEY: encode_metadata(meta)})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gradio_env(tmp: Path) -> dict:
    """Gradio offline and quiet, its temporary files under `tmp`."""
    (tmp / "gradio").mkdir(parents=True, exist_ok=True)
    return {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_TEMP_DIR": str(tmp / "gradio"), "TMPDIR": str(tmp / "gradio")}


def set_gradio_env(monkeypatch, tmp: Path) -> None:
    for k, v in gradio_env(tmp).items():
        monkeypatch.setenv(k, v)  # restored after the test
