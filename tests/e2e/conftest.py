"""A real stack for end-to-end tests: `sma up` as a process on loopback, tiny profile.

The home gets tiny synthetic corpora (general, ds, dl) before the first start, so the first
start trains in seconds instead of building the demo corpus.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.loadrun import proc_children
from bench.stack import free_port_block
from tests.conftest import VOCAB, synthetic_documents, write_domain

READY_TIMEOUT = 240.0


class Stack:
    """One `sma up` process and an HTTP client to its gateway."""

    def __init__(self, home: Path, port: int | None = None, env: dict | None = None) -> None:
        self.home = home
        self.env = env or {}  # on top of the test's environment (API keys, say)
        self.port = port or free_port_block()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home / "stack.log"
        self.process: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, timeout=120.0)

    def grpc_address(self, service: str) -> str:
        offset = ("registry", "training", "inference").index(service)
        return f"127.0.0.1:{self.port + 1 + offset}"

    def metrics_url(self, service: str) -> str:
        """A gRPC server's /metrics: its gRPC port + 1000, as `sma up` derives it."""
        port = int(self.grpc_address(service).rpartition(":")[2]) + 1000
        return f"http://127.0.0.1:{port}/metrics"

    def start(self) -> Stack:
        env = {**os.environ, "SMA_THREADS": "1", "SMA_TRAIN_THREADS": "1", "SMA_MAX_BATCH": "8"}
        env.update(self.env)
        env.pop("SMA_HOME", None)
        command = [sys.executable, "-m", "shiftable.cli", "up", "--home", str(self.home)]
        command += ["--profile", "tiny", "--device", "cpu", "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def health(self) -> dict | None:
        try:
            return self.http.get("/health", timeout=5.0).json()
        except (httpx.HTTPError, ValueError):
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.tail()
            last = self.health()
            if last and last["ready"]:
                return last
            time.sleep(0.3)
        raise AssertionError(f"stack not ready in {timeout} s: {last}\n{self.tail()}")

    def pids(self) -> dict[str, int]:
        return json.loads((self.home / "state" / "stack.json").read_text())["children"]

    def tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        self.http.close()
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def wait_for(predicate, timeout: float = 120.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout} s")


def tiny_home(root: Path) -> Path:
    for name in VOCAB:
        write_domain(root / "data", name, synthetic_documents(name, 40))
    return root


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack that made its first start (trained and serves) for the whole module."""
    running = Stack(tiny_home(tmp_path_factory.mktemp("stack"))).start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def job_processes(parent: int) -> list[int]:
    """The training server's job processes (multiprocessing's spawned children, not its
    resource tracker)."""
    return [
        pid
        for pid, command in proc_children(parent)
        if b"spawn_main" in command and b"resource_tracker" not in command
    ]


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """A Server-Sent Events response's (event, data) pairs, as they arrive."""
    name = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            yield name, json.loads(line[6:])
