"""`python -m trainer.pretrain` on bad input: exit code 2 and one readable `error:` line, no traceback.

Each case runs the real command line in a subprocess. One tiny real run (2 steps, ResNet-18,
16 px views) provides the run directory for the resume and overwrite cases.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT

from trainer.config import PRESETS

TINY = ["--preset", "cpu-quick", "--max-steps", "2", "--batch-size", "8", "--no-progress",
        "--set", "model.projector_hidden_dim=64", "--set", "model.predictor_hidden_dim=64",
        "--set", "data.workers=0", "--set", "data.image_size=16", "--set", "run.precision=fp32"]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def command(*args) -> list[str]:
    return [sys.executable, "-m", "trainer.pretrain", *map(str, args)]


def run_all(commands: dict, logs: Path, parallel: int = 4, timeout: float = 300) -> dict:
    """Run the command lines, at most `parallel` at a time -> {name: CompletedProcess}.

    Output goes to files under `logs` (no pipe can fill up and stall a child).
    """
    pending, running, results = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            # the child writes to these while it runs; closed once it has exited
            out, err = open(logs / f"{name}.out", "w"), open(logs / f"{name}.err", "w")  # noqa: SIM115
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=out, stderr=err, text=True)
            running[name] = (proc, out, err, time.monotonic())
        for name, (proc, out, err, started) in list(running.items()):
            if proc.poll() is None and time.monotonic() - started > timeout:
                proc.kill()
            if proc.poll() is None:
                continue
            out.close()
            err.close()
            results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, Path(out.name).read_text(),
                                                        Path(err.name).read_text())
            del running[name]
        time.sleep(0.05)
    return results


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, exactly one `error: ...` line that contains every needle, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    line = errors[0]
    for needle in needles:
        assert needle in line, (needle, line)
    assert result.stdout.strip() == ""  # no summary printed
    return line


BAD_SETS = {
    "set-no-equals": ("model.arch", ["--set expects section.key=value", "'model.arch'"]),
    "set-unknown-key": ("optim.learning_rate=0.1", ["optim has no setting", "'learning_rate'", "base_lr"]),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory, image_folder):
    """Every command line of this module, run as real subprocesses.

    The independent cases run a few at a time (each one mostly spends its time importing torch); the
    resume and overwrite cases then run against the finished tiny run.
    """
    base = tmp_path_factory.mktemp("cli")
    empty = base / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    run = base / "run"
    paths = {"missing": base / "no-such-folder", "empty": empty, "run": run}
    commands = {
        "real-run": command("--data", image_folder, "--out", run, *TINY),
        "help": command("--help"),
        "missing-data": command("--data", paths["missing"], "--out", base / "out-missing", *TINY),
        "empty-folder": command("--data", empty, "--out", base / "out-empty", *TINY),
        "unknown-preset": command("--data", image_folder, "--out", base / "out-preset",
                                 "--preset", "imagenet-resnet5000"),
        "unknown-arch": command("--data", image_folder, "--out", base / "out-arch", *TINY, "--arch", "resnet7"),
        "batch-too-large": command("--data", image_folder, "--out", base / "out-batch", *TINY,
                                  "--batch-size", "64"),
        "extend-nothing": command("--data", image_folder, "--out", base / "out-extend", "--extend",
                                 "--time-budget", "1m"),
        **{name: command("--data", image_folder, "--out", base / f"out-{name}", "--set", assignment)
           for name, (assignment, _) in BAD_SETS.items()},
    }
    results = run_all(commands, base)
    if results["real-run"].returncode == 0:
        mtime = (run / "checkpoint.pt").stat().st_mtime_ns
        results.update(run_all({
            "overwrite": command("--data", image_folder, "--out", run, *TINY),
            "resume-other-arch": command("--data", image_folder, "--out", run, "--resume", "--arch", "resnet34",
                                        "--no-progress", "--set", "data.workers=0"),
            "extend-without-length": command("--out", run, "--extend"),
        }, base))
        paths["checkpoint_mtime_before"] = mtime
    return results, paths


def test_help_lists_presets(cli):
    result = cli[0]["help"]
    assert result.returncode == 0, result.stderr
    for name in PRESETS:
        assert name in result.stdout
    assert "--resume" in result.stdout and "--set" in result.stdout


def test_missing_data_path(cli):
    results, paths = cli
    assert_usage_error(results["missing-data"], str(paths["missing"]), "does not exist")
    assert not (paths["missing"].parent / "out-missing").exists()


def test_empty_folder(cli):
    results, paths = cli
    assert_usage_error(results["empty-folder"], "no images found", str(paths["empty"]))


def test_unknown_preset(cli):
    line = assert_usage_error(cli[0]["unknown-preset"], "unknown preset", "imagenet-resnet5000")
    assert all(name in line for name in PRESETS)


def test_unknown_architecture(cli):
    assert_usage_error(cli[0]["unknown-arch"], "unknown architecture", "'resnet7'", "resnet18", "resnet50")


def test_batch_larger_than_data(cli):
    assert_usage_error(cli[0]["batch-too-large"], "batch size 64", "18 images", "--batch-size")


@pytest.mark.parametrize("name", sorted(BAD_SETS))
def test_bad_set_syntax(cli, name):
    assert_usage_error(cli[0][name], *BAD_SETS[name][1])


def test_tiny_real_run_succeeds_with_weights_only_checkpoint(cli):
    results, paths = cli
    result, run = results["real-run"], paths["run"]
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["pipeline"] == "memory"
    for name in ("checkpoint.pt", "encoder.safetensors", "config.json", "metrics.jsonl", "summary.json"):
        assert (run / name).is_file(), name
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["config"]["model"]["arch"] == "resnet18_w16"
    groups = ckpt["optimizer"]["param_groups"]
    assert all(isinstance(g["lr"], float) for g in groups)
    # encoder + projector (weights, then biases/BN), then the predictor at the preset's 10x LR
    assert [g["lr_scale"] for g in groups] == [1.0, 1.0, 10.0, 10.0]
    assert groups[0]["lr"] > 0 and groups[2]["lr"] == pytest.approx(10 * groups[0]["lr"])


def _needs_real_run(cli):
    results, paths = cli
    assert results["real-run"].returncode == 0, results["real-run"].stderr[-3000:]
    return results, paths


def test_out_already_holds_a_run(cli):
    results, paths = _needs_real_run(cli)
    assert_usage_error(results["overwrite"], "already holds a run", "--resume", str(paths["run"]))
    assert (paths["run"] / "checkpoint.pt").stat().st_mtime_ns == paths["checkpoint_mtime_before"]


def test_resume_with_another_architecture(cli):
    results, paths = _needs_real_run(cli)
    assert_usage_error(results["resume-other-arch"], "cannot resume", "model.arch='resnet18_w16'", "'resnet34'")
    assert (paths["run"] / "checkpoint.pt").stat().st_mtime_ns == paths["checkpoint_mtime_before"]


def test_extend_needs_a_run_and_a_length(cli):
    results, paths = _needs_real_run(cli)
    assert_usage_error(results["extend-nothing"], "--extend: no run to extend", "out-extend")
    assert_usage_error(results["extend-without-length"], "--extend needs --time-budget or --max-steps")
    assert (paths["run"] / "checkpoint.pt").stat().st_mtime_ns == paths["checkpoint_mtime_before"]
