"""Checkpoints (everything an exact resume needs) and the encoder-only export (encoder sources such as
random:ARCH are read by trainer.sources).

run_dir/
  checkpoint.pt          latest full checkpoint, replaced atomically
  encoder.safetensors    the online encoder's weights + metadata (architecture, embedding size,
                         preprocessing contract): what export, evaluation and the app consume
Loading never unpickles code: torch.load(weights_only=True) and safetensors only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open, save_file

from contract.preprocess import Preprocessing

from . import __version__
from .models import build_encoder

CHECKPOINT_NAME = "checkpoint.pt"
ENCODER_NAME = "encoder.safetensors"
ENCODER_FORMAT = "byolkit-encoder/1"


class CheckpointError(ValueError):
    """A checkpoint or encoder file that cannot be used (missing, corrupt, mismatched)."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename over `path`: readers see the old file or the new one.
    The file gets the permissions a plain open() would give it (0666 less the umask), not
    mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# -- RNG state -------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a checkpoint of every visible GPU's generator could not be
        # restored on a machine with fewer of them ("invalid device ordinal")
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints held every visible device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda, torch.cuda.current_device())


# -- full checkpoints ------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, *, model, optimizer, step: int, config: dict, extra: dict | None = None) -> Path:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
               "config": config, "rng": rng_state(), "byolkit_version": __version__, **(extra or {})}
    path = Path(run_dir) / CHECKPOINT_NAME
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return path


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds for a foreign file
        raise CheckpointError(f"{path} is not a readable byolkit checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path} is a torch file but not a byolkit checkpoint")
    return ckpt


def check_same_model(saved: dict, current: dict, path: Path) -> None:
    """Refuse to resume into a different network: the state dicts would not match anyway."""
    for key in ("arch", "stem", "projector_hidden_dim", "projection_dim", "predictor_hidden_dim"):
        if saved["model"].get(key) != current["model"].get(key):
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with model.{key}={saved['model'].get(key)!r}, "
                f"this run asks for {current['model'].get(key)!r}")


# -- the encoder-only export -----------------------------------------------------------------
def weights_fingerprint(state_dict: dict) -> str:
    """A short hash of the weights, so that downstream artefacts can name their source."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_encoder(path: Path, encoder: torch.nn.Module, *, arch: str, stem: str, embedding_dim: int,
                 preprocessing: Preprocessing, step: int = 0) -> dict:
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    metadata = {"format": ENCODER_FORMAT, "arch": arch, "stem": stem, "embedding_dim": str(embedding_dim),
                "preprocessing": json.dumps(preprocessing.to_dict()), "step": str(step),
                "fingerprint": weights_fingerprint(state), "byolkit_version": __version__}
    atomic_write(Path(path), lambda tmp: save_file(state, tmp, metadata=metadata))
    return metadata


def read_encoder_metadata(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for foreign files
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != ENCODER_FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a byolkit encoder (format={meta.get('format')!r})")
    return meta


def load_encoder(source: str | Path) -> tuple[torch.nn.Module, dict]:
    """A run directory, a full checkpoint or an encoder file -> (encoder in eval mode, info).

    info: arch, stem, embedding_dim (int), preprocessing (Preprocessing), fingerprint, step.
    """
    path = Path(source)
    if path.is_dir():
        if (path / ENCODER_NAME).is_file():
            path = path / ENCODER_NAME
        elif (path / CHECKPOINT_NAME).is_file():
            path = path / CHECKPOINT_NAME
        else:
            raise CheckpointError(f"{path} holds neither {ENCODER_NAME} nor {CHECKPOINT_NAME}")
    if not path.is_file():
        raise CheckpointError(f"no encoder or checkpoint at {path}")
    if path.suffix == ".safetensors":
        meta = read_encoder_metadata(path)
        state = load_file(str(path))
        info = {"arch": meta["arch"], "stem": meta["stem"], "embedding_dim": int(meta["embedding_dim"]),
                "preprocessing": Preprocessing.from_dict(json.loads(meta["preprocessing"])),
                "fingerprint": meta["fingerprint"], "step": int(meta.get("step", 0))}
    else:
        from .config import Config
        ckpt = load_checkpoint(path)
        cfg = Config.from_dict(ckpt["config"])
        prefix = "encoder."
        state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        info = {"arch": cfg.model.arch, "stem": cfg.model.stem, "preprocessing": cfg.data.preprocessing(),
                "fingerprint": weights_fingerprint(state), "step": int(ckpt["step"])}
    encoder, dim = build_encoder(info["arch"], info["stem"])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not match a {info['arch']} ({info['stem']} stem) encoder: "
                              f"{str(e).splitlines()[0]}") from None
    info["embedding_dim"] = dim
    return encoder.eval(), info
