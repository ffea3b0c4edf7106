"""The Triton Python-backend model that `serving.server` puts in its model repository as model.py.

It runs inside the python backend stub of the tritonserver binary bundled with nvidia-pytriton.
Why this API and not PyTriton's inference callable: the callable receives a dynamic batch and
any exception in it fails every request of that batch with a traceback as the message. Here
`execute` gets the batch as a list of requests, validates and decodes each one on its own, runs
the valid ones through ONNX Runtime as one array, and answers a bad request with
`InferenceResponse(error=TritonError(...))`: only that request fails, with a one-line message,
and the requests batched with it succeed (tests/test_serving.py proves it under concurrency).

Two kinds, chosen by the `byolkit_kind` parameter of config.pbtxt:
  tensor  the exported model's own input (`images` uint8 [N, H, W, 3] or `pixel_values` float32
          [N, 3, H, W]); Triton itself checks names, types, shapes and the batch limit.
  image   `image_bytes` BYTES [N, 1]: encoded images, decoded, EXIF-rotated, converted to RGB and
          resized here by the preprocessing contract.
Both answer `embeddings` float32 [N, D], L2-normalised unless the request has the parameter
`raw` = true.
"""
from __future__ import annotations

import json
import os
import sys

# The backend stub embeds Python in isolated mode (PYTHONPATH is ignored): the server names the
# byolkit checkout it runs from, so that this model imports the same code as the server.
if os.environ.get("BYOLKIT_ROOT") and os.environ["BYOLKIT_ROOT"] not in sys.path:
    sys.path.insert(0, os.environ["BYOLKIT_ROOT"])

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image

from contract.preprocess import ImageDecodeError
from serving.engine import OnnxEncoder, l2_normalize

IMAGE_INPUT = "image_bytes"


class BadRequest(ValueError):
    """A request this model answers with an error of its own (INVALID_ARG)."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.kind = params["byolkit_kind"]
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.max_pixels = int(params["max_pixels"])
        self.max_image_bytes = int(params["max_image_bytes"])
        # --max-pixels decides, read from the image's header before decoding (contract.preprocess.load_rgb);
        # Pillow's own bomb check would refuse above 179 megapixels before that, with its own message
        Image.MAX_IMAGE_PIXELS = None
        onnx_path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.encoder = OnnxEncoder(onnx_path, device=params.get("device", "auto"),
                                   threads=int(params.get("threads", "0")))
        # Triton counts a response carrying an error as a successful request (nv_inference_request_*):
        # refused requests get a counter of their own on the same metrics endpoint
        # (the family must outlive its metric: both are kept)
        self.refused_family = pb_utils.MetricFamily(
            name="byolkit_refused_requests_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests answered with an error by the byolkit model (bad input or failed inference)")
        self.refused = self.refused_family.Metric(labels={"model": config["name"], "version": args["model_version"]})
        pb_utils.Logger.log_info(f"byolkit {config['name']}: {self.encoder.path} on {self.encoder.providers[0]}")

    # -- one request -> model input, or BadRequest ---------------------------------------------
    def _inputs(self, request) -> np.ndarray:
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:  # Triton checks required inputs; kept for a clear message all the same
            raise BadRequest(f"missing input {self.input_name!r}")
        array = tensor.as_numpy()
        if self.kind == "tensor":
            if array.dtype == np.float32 and not np.isfinite(array).all():
                raise BadRequest(f"input {self.input_name!r} holds NaN or infinite values")
            return array
        items = array.reshape(-1)
        pixels = []
        for i, data in enumerate(items):
            if isinstance(data, str):  # JSON (non-binary) HTTP requests carry strings
                data = data.encode("latin-1")
            try:
                pixels.append(self.encoder.decode(data, self.max_pixels, self.max_image_bytes))
            except ImageDecodeError as e:
                where = f"image {i} of {len(items)}: " if len(items) > 1 else ""
                raise BadRequest(f"{where}{e}") from None
        return self.encoder.model_input(np.stack(pixels))

    @staticmethod
    def _wants_raw(request) -> bool:
        params = json.loads(request.parameters() or "{}")
        raw = params.get("raw", False)
        if not isinstance(raw, bool):
            raise BadRequest(f"parameter 'raw' must be a boolean, got {raw!r}")
        return raw

    def _response(self, embeddings: np.ndarray, raw: bool):
        out = embeddings if raw else l2_normalize(embeddings)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)])

    def _error(self, message: str, code=None):
        try:  # counting must never turn one refusal into a failed batch
            self.refused.increment(1)
        except Exception:  # noqa: BLE001, S110
            pass
        code = pb_utils.TritonError.INVALID_ARG if code is None else code
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    # -- a dynamic batch of requests -------------------------------------------------------------
    def execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (request index, model input, raw)
        for i, request in enumerate(requests):
            try:
                good.append((i, self._inputs(request), self._wants_raw(request)))
            except BadRequest as e:
                responses[i] = self._error(str(e))
            except Exception as e:  # noqa: BLE001 - anything unforeseen still fails this request alone
                responses[i] = self._error(f"{type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
        if good:
            try:
                out = self.encoder.run(np.concatenate([x for _, x, _ in good]))
                start = 0
                for i, x, raw in good:
                    responses[i] = self._response(out[start:start + len(x)], raw)
                    start += len(x)
            except Exception:  # noqa: BLE001
                # the batch failed as a whole: run each request alone, so only the culprit fails
                for i, x, raw in good:
                    try:
                        responses[i] = self._response(self.encoder.run(x), raw)
                    except Exception as e:  # noqa: BLE001 - reported to the request
                        responses[i] = self._error(f"inference failed: {type(e).__name__}: {e}",
                                                   pb_utils.TritonError.INTERNAL)
        return responses

    def finalize(self):
        self.encoder = None
        self.refused = None  # the metric before its family
        self.refused_family = None
