"""Full checkpoints (exact resume), atomic writes and the encoder-only safetensors export."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from contract.preprocess import CIFAR10_MEAN, CIFAR10_STD, Preprocessing
from trainer import __version__
from trainer.checkpoint import (
    CHECKPOINT_NAME,
    ENCODER_FORMAT,
    ENCODER_NAME,
    CheckpointError,
    atomic_write,
    check_same_model,
    load_checkpoint,
    load_encoder,
    read_encoder_metadata,
    save_checkpoint,
    save_encoder,
    set_rng_state,
    weights_fingerprint,
)
from trainer.config import Config, preset
from trainer.models import BYOL, build_encoder
from trainer.optim import LARS, parameter_groups
from trainer.sources import open_encoder


def small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def trained(model, optimizer, steps=2):
    for _ in range(steps):
        loss = model(torch.randn(8, 6)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# -- full checkpoints --------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_everything(tmp_path):
    model = small_model(0)
    opt = LARS(parameter_groups([model], 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4)
    trained(model, opt)
    cfg = preset("cpu-quick").to_dict()
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, step=17, config=cfg, extra={"note": "x"})
    assert path == tmp_path / CHECKPOINT_NAME and path.is_file()
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]  # no temp file left behind
    # what the process would draw next, right after saving
    expect_torch, expect_np, expect_py = torch.rand(5), np.random.rand(3), random.random()
    # ... then the process keeps drawing and training
    torch.rand(100), np.random.rand(10), random.random()
    trained(model, opt)

    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 17 and ckpt["config"] == cfg and ckpt["note"] == "x"
    assert ckpt["byolkit_version"] == __version__
    fresh = small_model(1)
    fresh.load_state_dict(ckpt["model"])
    saved_sd = torch.load(path, weights_only=True)["model"]
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved_sd[k])
    fresh_opt = LARS(parameter_groups([fresh], 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4)
    fresh_opt.load_state_dict(ckpt["optimizer"])
    assert len(fresh_opt.state) == len(list(fresh.parameters()))
    for p_saved, p_new in zip(ckpt["optimizer"]["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert torch.equal(p_saved["momentum_buffer"], p_new["momentum_buffer"])
    assert [g["lars_exclude"] for g in fresh_opt.param_groups] == [False, True]
    set_rng_state(ckpt["rng"])
    assert torch.equal(torch.rand(5), expect_torch)
    assert np.array_equal(np.random.rand(3), expect_np)
    assert random.random() == expect_py
    assert Config.from_dict(ckpt["config"]) == preset("cpu-quick")


def test_checkpoint_loads_with_weights_only(tmp_path):
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trained(model, opt, 1)
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, step=1, config=Config().to_dict())
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # raises if anything needs unpickling code
    assert set(ckpt) >= {"model", "optimizer", "step", "config", "rng", "byolkit_version"}


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(2048))
    with pytest.raises(CheckpointError, match="not a readable byolkit checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(CheckpointError, match="not a byolkit checkpoint"):
        load_checkpoint(other)


def test_check_same_model_names_the_difference(tmp_path):
    a, b = preset("cpu-quick").to_dict(), preset("cpu-quick").to_dict()
    check_same_model(a, b, tmp_path)
    b["model"]["arch"] = "resnet34"
    with pytest.raises(CheckpointError, match="model.arch='resnet18_w16'.*'resnet34'"):
        check_same_model(a, b, tmp_path)


# -- atomic writes -----------------------------------------------------------------------------
def test_atomic_write_replaces_and_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, lambda tmp: Path(tmp).write_text("old"))
    assert target.read_text() == "old"

    def broken(tmp):
        with open(tmp, "w") as f:
            f.write("half-writ")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]  # the temp file is gone
    atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    """Not mkstemp's 0600: a file another user of the group could read after open() stays readable."""
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.json", lambda tmp: Path(tmp).write_text("{}"))
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


# -- encoder export ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoder_and_input():
    torch.manual_seed(0)
    enc, dim = build_encoder("resnet18", "small")
    enc.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        enc(torch.rand(4, 3, 16, 16) * 3 + 1)
    return enc.eval(), dim, torch.rand(2, 3, 16, 16)


def test_save_and_load_encoder_round_trip(tmp_path, encoder_and_input):
    enc, dim, x = encoder_and_input
    pre = Preprocessing.for_image_size(32, CIFAR10_MEAN, CIFAR10_STD)
    path = tmp_path / ENCODER_NAME
    meta = save_encoder(path, enc, arch="resnet18", stem="small", embedding_dim=dim, preprocessing=pre, step=42)
    assert meta["format"] == ENCODER_FORMAT
    assert read_encoder_metadata(path)["fingerprint"] == meta["fingerprint"]
    loaded, info = load_encoder(path)
    assert not loaded.training
    assert info["arch"] == "resnet18" and info["stem"] == "small"
    assert info["embedding_dim"] == 512 and info["step"] == 42
    assert info["preprocessing"] == pre
    assert info["fingerprint"] == weights_fingerprint(enc.state_dict()) == meta["fingerprint"]
    with torch.no_grad():
        want, got = enc(x), loaded(x)
    assert got.shape == (2, 512)
    assert torch.equal(want, got)
    # a run directory holding the encoder file resolves to it
    loaded_dir, info_dir = load_encoder(tmp_path)
    assert info_dir["fingerprint"] == meta["fingerprint"]
    with torch.no_grad():
        assert torch.equal(loaded_dir(x), want)


def test_load_encoder_from_run_dir_with_only_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    cfg = preset("cpu-quick")
    enc, dim = build_encoder(cfg.model.arch, cfg.model.stem)
    byol = BYOL(enc, dim, 32, cfg.model.projection_dim, 32)
    with torch.no_grad():  # make online and target differ, so loading the wrong one would show
        for p in byol.encoder.parameters():
            p.add_(0.01)
    opt = torch.optim.SGD(byol.online_parameters(), lr=0.1)
    save_checkpoint(tmp_path, model=byol, optimizer=opt, step=9, config=cfg.to_dict())
    loaded, info = load_encoder(tmp_path)
    assert info["arch"] == "resnet18_w16" and info["stem"] == "small" and info["step"] == 9
    assert info["embedding_dim"] == 128
    assert info["preprocessing"] == cfg.data.preprocessing()
    assert info["fingerprint"] == weights_fingerprint(byol.encoder.state_dict())
    assert info["fingerprint"] != weights_fingerprint(byol.target_encoder.state_dict())
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), byol.encoder.eval()(x))
    # the checkpoint file named directly works the same
    _, info2 = load_encoder(tmp_path / CHECKPOINT_NAME)
    assert info2["fingerprint"] == info["fingerprint"]


def test_load_encoder_rejects_foreign_files(tmp_path, encoder_and_input):
    with pytest.raises(CheckpointError, match="holds neither"):
        load_encoder(tmp_path)  # an empty directory
    with pytest.raises(CheckpointError, match="no encoder or checkpoint"):
        load_encoder(tmp_path / "missing.safetensors")
    random_st = tmp_path / "random.safetensors"
    random_st.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(random_st)
    random_pt = tmp_path / "random.pt"
    random_pt.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_encoder(random_pt)
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(plain), metadata={"framework": "pt"})
    with pytest.raises(CheckpointError, match="not a byolkit encoder"):
        load_encoder(plain)
    # byolkit metadata, but the weights belong to another architecture
    enc, dim, _ = encoder_and_input
    wrong = tmp_path / "wrong.safetensors"
    meta = save_encoder(wrong, enc, arch="resnet18", stem="small", embedding_dim=dim,
                        preprocessing=Preprocessing(32, 32))
    state = {k: v.contiguous() for k, v in enc.state_dict().items()}
    save_file(state, str(wrong), metadata={**meta, "arch": "resnet34"})
    with pytest.raises(CheckpointError, match="do not match a resnet34"):
        load_encoder(wrong)


def test_weights_fingerprint_tracks_the_weights():
    model = small_model(0)
    sd = model.state_dict()
    fp = weights_fingerprint(sd)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert weights_fingerprint(dict(reversed(list(sd.items())))) == fp  # key order does not matter
    assert weights_fingerprint(small_model(0).state_dict()) == fp
    changed = {k: v.clone() for k, v in sd.items()}
    changed["0.weight"][0, 0] += 1e-3
    assert weights_fingerprint(changed) != fp
    renamed = {("x" + k): v for k, v in sd.items()}
    assert weights_fingerprint(renamed) != fp
    assert weights_fingerprint({k: v.double() for k, v in sd.items()}) != fp


# -- encoder sources for evaluation and fine-tuning ---------------------------------------------
def test_open_encoder_sources(tmp_path, encoder_and_input):
    enc, dim, _x = encoder_and_input
    pre = Preprocessing(40, 48, CIFAR10_MEAN, CIFAR10_STD)
    save_encoder(tmp_path / ENCODER_NAME, enc, arch="resnet18", stem="small", embedding_dim=dim, preprocessing=pre)
    _trained_enc, info = open_encoder(tmp_path)
    assert info["source"] == "byol" and info["fingerprint"] == weights_fingerprint(enc.state_dict())
    # random:PATH: the same architecture and contract, fresh (seeded, reproducible) weights
    fresh, finfo = open_encoder(f"random:{tmp_path}", seed=3)
    again, _ = open_encoder(f"random:{tmp_path}", seed=3)
    assert finfo["source"] == "random" and finfo["arch"] == "resnet18" and finfo["stem"] == "small"
    assert finfo["preprocessing"] == pre and finfo["embedding_dim"] == 512
    assert finfo["fingerprint"] != info["fingerprint"]
    assert finfo["fingerprint"] == weights_fingerprint(again.state_dict())
    assert not fresh.training
    # random:ARCH[:STEM[:SIZE]]: the default contract of that stem
    _, rinfo = open_encoder("random:resnet18_w16:small:24")
    assert (rinfo["arch"], rinfo["stem"], rinfo["preprocessing"].input_size) == ("resnet18_w16", "small", 24)
    assert rinfo["preprocessing"].mean == CIFAR10_MEAN
    _, rinfo = open_encoder("random:resnet18")
    assert rinfo["stem"] == "imagenet" and rinfo["preprocessing"].input_size == 224


@pytest.mark.parametrize("spec, message", [
    ("random:resnet9", "unknown architecture"),
    ("random:resnet18:tiny", "unknown stem"),
    ("random:resnet18:small:big", "must be an integer"),
    ("random:resnet18:small:4", "outside 8-1024"),
    ("supervised:resnet9000", "no supervised weights"),
    ("nowhere/encoder.safetensors", "no encoder or checkpoint"),
])
def test_open_encoder_errors(spec, message, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CheckpointError, match=message):
        open_encoder(spec)


def test_supervised_weights_are_never_downloaded(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(CheckpointError, match="not in the local cache"):
        open_encoder("supervised:resnet18")
