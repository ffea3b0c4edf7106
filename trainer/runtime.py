"""The plumbing every command of the trainer shares, written once.

- `UsageError` (a bad command line or setting) and `DataError` (data that cannot be used as given),
  both defined in the torch-free contract.errors (the server reports the same UsageError), and
  `TrainingError` (training that cannot go on); `cli_main` turns them, and `CheckpointError`, into
  one `error: ...` line on stderr and exit status 2.
- `resolve_device`, `seed_process`: the device type to run on and each process's seed.
- `log`, `progress_bar`: messages on stderr from the main process, above the tqdm bar.
- `Stop`: SIGINT/SIGTERM ask the loop to checkpoint and stop (a second signal stops at once); as a
  context manager it restores the previous handlers when the loop ends.
- `open_run`: the run-directory check and the resume, with one behaviour for every command:

  * without `--resume`, an `--out` that already holds a checkpoint is refused (a usage error that
    names `--resume`), so a finished or half-finished run is never overwritten;
  * with `--resume`, the run continues from `--out/checkpoint.pt` with its own saved settings;
  * with `--resume` and no checkpoint in `--out` yet, the run starts from scratch and says so on
    stderr (`--resume: no checkpoint in OUT yet, starting from scratch`), so that a job script for
    a preemptible machine can pass `--resume` on every start, the first included.
"""
from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from contract.errors import DataError, UsageError

from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint


class TrainingError(RuntimeError):
    """Training that cannot go on (a loss that is no longer finite)."""


USER_ERRORS = (UsageError, DataError, TrainingError, CheckpointError)


def report_error(e: BaseException) -> int:
    """The one-line report of a user-facing error; returns the exit status 2."""
    print(f"error: {e}", file=sys.stderr)
    return 2


def cli_main(fn: Callable | None = None, *, errors: tuple = ()) -> Callable:
    """Decorate a command's `main(argv=None) -> int`: the user-facing errors (USER_ERRORS and
    `errors`) become one `error:` line on stderr and exit status 2; the rest propagate (bugs).

        @cli_main
        def main(argv=None) -> int: ...
    """
    def wrap(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapped(argv=None) -> int:
            try:
                return main(argv)
            except USER_ERRORS + tuple(errors) as e:
                return report_error(e)
        return wrapped
    return wrap(fn) if fn is not None else wrap


# ============================================================================================
# Device, seeds
# ============================================================================================
def resolve_device(want: str) -> str:
    """--device auto|cpu|cuda -> the device type to run on; cuda without a GPU is a usage error."""
    if want not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown device {want!r}; choose auto, cpu or cuda")
    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if want == "auto" else want
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    return device_type


def seed_process(seed: int, rank: int = 0, resumed_at: int | None = None) -> None:
    """Seed torch's global generator for process `rank`, so that each process draws differently.
    A run resumed at step `resumed_at`: the main process has restored its saved RNG state and keeps
    it; the others (whose state is not saved) are seeded anew, apart from the draws of the start."""
    if resumed_at is None:
        torch.manual_seed(seed + rank)
    elif rank:
        torch.manual_seed(seed + rank + 7919 * int(resumed_at))


# ============================================================================================
# Messages and progress
# ============================================================================================
def log(dist, msg: str) -> None:
    """A message on stderr from the main process (all processes when `dist` is None), printed above
    the progress bar."""
    if dist is None or dist.is_main:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def progress_bar(total: int, start: int = 0, enabled: bool = True, desc: str = "", unit: str = "step"):
    """tqdm over optimiser steps (disabled: a no-op bar with the same methods)."""
    from tqdm import tqdm
    return tqdm(total=total, initial=start, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)


# ============================================================================================
# Stop on a signal
# ============================================================================================
class Stop:
    """SIGINT/SIGTERM: `requested` turns true; the loop finishes its step, checkpoints and stops.
    A second signal stops at once (KeyboardInterrupt).

        with Stop() as stop:      # the previous handlers come back on exit
            while ... and not stop.requested: ...
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def install(self) -> Stop:
        self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    __enter__ = install

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame):
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True


# ============================================================================================
# Run directory and resume
# ============================================================================================
def open_run(out: str | Path, resume: bool, kind: str | None = None) -> dict | None:
    """The saved state to continue (with --resume and a checkpoint in `out`), or None for a run that
    starts from scratch; see the module's docstring for the rule. `kind`: the task the checkpoint's
    config must name (`config["task"]`), so that one command never resumes another's run."""
    out = Path(out)
    path = out / CHECKPOINT_NAME
    if resume and path.is_file():
        state = load_checkpoint(path)
        if kind is not None and state["config"].get("task") != kind:
            raise UsageError(f"{out} holds a {state['config'].get('task', 'pretraining')!r} run, not a {kind} run")
        return state
    if resume:
        print(f"--resume: no checkpoint in {out} yet, starting from scratch", file=sys.stderr)
        return None
    if path.exists():
        raise UsageError(f"{out} already holds a run; pass --resume to continue it or choose a new --out")
    return None
