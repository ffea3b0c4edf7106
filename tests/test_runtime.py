"""trainer.runtime and trainer.settings: the plumbing every training command shares (fast, no training)."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import ClassVar

import pytest
import torch

from trainer import settings
from trainer.checkpoint import save_checkpoint
from trainer.runtime import DataError, Stop, UsageError, cli_main, open_run, seed_process


@dataclasses.dataclass
class Flat:
    FIXED_ON_RESUME: ClassVar[tuple] = ("lr",)
    lr: float = 0.1
    epochs: int = 3
    name: str = "a"
    flag: bool = False
    path: str | None = None


def test_set_parses_by_the_settings_type_and_refuses_unknown_names():
    s = Flat()
    for assignment in ("lr=1", "epochs=7", "name=12", "flag=true", "path=runs/x"):
        settings.apply_override(s, assignment)
    assert (s.lr, s.epochs, s.name, s.flag, s.path) == (1.0, 7, "12", True, "runs/x")
    assert isinstance(s.lr, float)
    for bad, words in (("lr", "key=value"), ("nope=1", "no setting 'nope'"), ("epochs=x", "expected a number"),
                       ("flag=2", "true or false"), ("a.b=1", "plain names")):
        with pytest.raises(UsageError, match=words):
            settings.apply_override(s, bad)


def test_resolve_layers_defaults_saved_set_and_flags_and_refuses_a_changed_fixed_setting(tmp_path):
    new = settings.resolve(Flat, None, ["epochs=5", "lr=0.3"], {"lr": 0.2, "name": None})
    assert (new.epochs, new.lr, new.name) == (5, 0.2, "a")  # flags after --set; None = not given
    saved = settings.to_dict(new)
    resumed = settings.resolve(Flat, saved, [], {"epochs": 9})
    assert (resumed.lr, resumed.epochs) == (0.2, 9)
    with pytest.raises(UsageError, match=r"cannot change --lr when resuming \(the run has 0.2, asked for 0.5\)"):
        settings.resolve(Flat, saved, ["lr=0.5"], {})
    settings.write_config(tmp_path, resumed)
    assert settings.read_config(tmp_path, Flat) == resumed
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 9


def test_open_run_one_resume_rule(tmp_path, capsys):
    assert open_run(tmp_path / "new", resume=False) is None
    assert open_run(tmp_path / "new", resume=True) is None  # nothing to resume yet: starts, and says so
    assert "no checkpoint in" in capsys.readouterr().err
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "run", model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), step=4,
                    config={"task": "segment"})
    with pytest.raises(UsageError, match="already holds a run; pass --resume"):
        open_run(tmp_path / "run", resume=False)
    assert open_run(tmp_path / "run", resume=True, kind="segment")["step"] == 4
    with pytest.raises(UsageError, match="not a depth run"):
        open_run(tmp_path / "run", resume=True, kind="depth")


def test_cli_main_reports_user_errors_in_one_line(capsys):
    @cli_main
    def main(argv=None):
        raise DataError(f"bad {argv}")

    assert main("x") == 2
    assert capsys.readouterr().err == "error: bad x\n"

    @cli_main
    def broken(argv=None):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        broken()


def test_stop_asks_once_then_interrupts_and_restores_the_handlers():
    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        with Stop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


def test_seed_process_leaves_a_resumed_main_process_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    seed_process(0, rank=0, resumed_at=10)
    assert torch.equal(torch.get_rng_state(), state)
    seed_process(0, rank=1, resumed_at=10)
    a = torch.rand(1)
    torch.manual_seed(0 + 1 + 7919 * 10)
    assert torch.equal(a, torch.rand(1))
