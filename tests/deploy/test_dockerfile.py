"""deploy/Dockerfile, built without a container engine (none runs on the machines this suite
runs on): its steps are read and run in order in a fresh virtual environment standing in for
the base image's Python, under a folder standing in for the image's root. COPY copies, ENV and
ARG set the environment of later steps, RUN runs, as `docker build` would; a step that changes
the operating system itself (creating the image's user) is checked rather than run. The result
must then do what the manifests ask of the image: each `sma serve <service>` starts and answers.

The one build argument given is TORCH_INDEX: PyTorch's CUDA index is out of reach here, so the
torch step uses PyPI's index, where pip's own configuration may offer a local CPU build.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.loopback import ROOT, STACK, render
from bench.stack import free_port_block

pytestmark = pytest.mark.slow

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
BUILD_ARGS = {"TORCH_INDEX": "https://pypi.org/simple"}
SYSTEM_STEPS = ("useradd", "chown")  # the image's user and its folder: root's work, not ours


@dataclass
class Image:
    """What the steps built: the image's root folder, and its Python's environment."""

    root: Path
    python: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: Path = Path("/")
    user: str = "root"
    cmd: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def path(self, inside: str) -> Path:
        """Where a path of the image lies on this machine."""
        return (
            self.root / Path(inside).relative_to("/")
            if inside.startswith("/")
            else (self.root / self.workdir.relative_to("/") / inside)
        )


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            joined += line.rstrip()[:-1] + " "
            continue
        lines.append(joined + line)
        joined = ""
    return [(parts[0].upper(), parts[1]) for parts in (line.split(None, 1) for line in lines)]


def expand(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m[1] or m[2]], value)


def build(work: Path) -> Image:
    venv = work / "python"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    image = Image(root=work / "root", python=venv / "bin" / "python")
    image.root.mkdir()
    args: dict[str, str] = {}
    for instruction, rest in instructions(DOCKERFILE.read_text()):
        variables = {**args, **image.env}
        if instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = BUILD_ARGS.get(name, default)
        elif instruction == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                image.env[name] = expand(value, variables)
        elif instruction == "WORKDIR":
            image.workdir = Path(expand(rest, variables))
            image.path(str(image.workdir)).mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            *sources, target = shlex.split(rest)
            for source in sources:
                copy(ROOT / source, image.path(target), many=len(sources) > 1)
        elif instruction == "RUN":
            command = expand(rest, variables)
            if any(word in shlex.split(command) for word in SYSTEM_STEPS):
                image.skipped.append(command)
                continue
            run(image, command)
        elif instruction == "USER":
            image.user = rest.strip()
        elif instruction == "CMD":
            image.cmd = shlex.split(rest.replace('", "', " ").strip('[]"'))
        elif instruction != "FROM":
            raise AssertionError(f"an instruction this build does not know: {instruction}")
    return image


def copy(source: Path, target: Path, many: bool) -> None:
    assert source.exists(), f"COPY of {source.relative_to(ROOT)}, which is not in the repository"
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "__pycache__", "*.egg-info"))  # fmt: skip
    else:
        target = target / source.name if many or target.is_dir() else target
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def environment(image: Image, **extra: str) -> dict[str, str]:
    path = f"{image.python.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMA_", "VIRTUAL_ENV"))}
    return {**env, **image.env, "PATH": path, **extra}


def run(image: Image, command: str) -> None:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=image.path(str(image.workdir)),
        env=environment(image),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"RUN {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("image"))


def test_the_image_is_made_of_the_repository_and_nothing_else(image: Image) -> None:
    packages = {p.name for p in image.path(str(image.workdir)).iterdir() if p.is_dir()}
    assert {"shiftable", "shiftable_lib", "services", "gateway", "protos", "bench"} <= packages
    assert (image.path(str(image.workdir)) / "frontend" / "index.html").is_file()
    assert image.cmd == ["sma", "up"]  # what `docker run` without a command runs


def test_the_system_steps_make_the_user_the_manifests_run_as(image: Image) -> None:
    (user_step,) = image.skipped
    uid = int(re.search(r"--uid (\d+)", user_step)[1])
    assert image.user == "sma" and "useradd" in user_step and f"chown {image.user}" in user_step
    home = image.env["SMA_HOME"]
    assert f"mkdir -p {home}" in user_step  # the volume's mount point exists, and is the user's
    for obj in render(STACK / "base"):
        if obj["kind"] in ("Deployment", "StatefulSet"):
            assert obj["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_the_images_python_has_torch_and_the_project(image: Image) -> None:
    done = subprocess.run(
        [str(image.python), "-c", "import torch, gateway.app; print(torch.__version__)"],
        env=environment(image),
        cwd=image.root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("2.13.0")


def test_each_service_the_manifests_run_starts_from_the_image(image: Image, tmp_path: Path) -> None:
    """The three gRPC servers together (health answers), then the gateway on its own (with
    nobody to dial, so that it starts no first training): the UI and /livez."""
    port = free_port_block(4)
    env = environment(
        image,
        SMA_HOME=str(tmp_path / "home"),  # the volume a pod would mount at SMA_HOME
        SMA_HOST="127.0.0.1",
        SMA_PORT=str(port),
        SMA_DEVICE="cpu",
    )
    with serving(image, env, "registry", "training", "inference"):
        for offset, name in enumerate(("registry", "training", "inference"), start=1):
            with grpc.insecure_channel(f"127.0.0.1:{port + offset}") as channel:
                grpc.channel_ready_future(channel).result(timeout=120)
                status = (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(health_pb2.HealthCheckRequest(), timeout=10)
                    .status
                )
            # inference has no model to serve in an empty home, and says so
            assert status == (NOT_SERVING if name == "inference" else SERVING), name
    alone = free_port_block(4)
    with serving(image, {**env, "SMA_PORT": str(alone)}, "gateway"):
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(f"http://127.0.0.1:{alone}/", timeout=5)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the gateway did not answer in 60 s"
                time.sleep(0.3)
        assert page.status_code == 200 and "Shiftable" in page.text  # the UI, from the image
        assert httpx.get(f"http://127.0.0.1:{alone}/livez", timeout=5).status_code == 200


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def serving(image: Image, env: dict[str, str], *services: str) -> Iterator[None]:
    """`sma serve <service>` for each, as the manifests run them, stopped with SIGTERM."""
    sma = str(image.python.parent / "sma")
    processes = [
        subprocess.Popen([sma, "serve", name], env=env, cwd=image.root,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in services
    ]  # fmt: skip
    try:
        yield
        assert all(p.poll() is None for p in processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
