"""`sma up`: the four servers as supervised child processes on loopback.

Each child is `sma serve <name>` with the stack's settings in its environment (explicit ports,
so every child agrees on every address). A child that dies is restarted after a back-off that
doubles while it keeps dying young; Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL
after a grace period). Ports are checked before anything starts, so a second stack on the
same ports fails at once with a clear message instead of restarting forever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import TextIO

from shiftable_lib.config import GRPC_SERVICES, WILDCARD_HOSTS, Settings

ORDER = ("registry", "training", "inference", "gateway")
GRACE_S = 10.0
HEALTHY_AFTER_S = 30.0  # a child that lived this long starts its back-off afresh
POLL_S = 1.0  # how often the first start's progress is read from /health
BAR = 24  # characters of a phase's progress bar


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float | None = None
    restarts: int = field(default=0)

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None


def _record_pids(settings: Settings, children: list[Child]) -> None:
    """`<home>/state/stack.json`: the supervisor's and each child's pid (for operators)."""
    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True)
    pids = {c.name: c.process.pid for c in children if c.process is not None}
    record = {"supervisor": os.getpid(), "children": pids, "port": settings.port}
    tmp = state / f".stack.json.{os.getpid()}"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, state / "stack.json")


def stack_env(settings: Settings) -> dict[str, str]:
    """The environment every child gets: the same home, profile, device and explicit ports."""
    env = dict(os.environ)
    env.update(
        SMA_HOME=str(settings.home.resolve()),
        SMA_PROFILE=settings.profile,
        SMA_DEVICE=settings.device,
        SMA_HOST=settings.host,
        SMA_PORT=str(settings.port),
        PYTHONUNBUFFERED="1",
    )
    if settings.base is not None:  # the training service imports it at a first start
        env["SMA_BASE"] = str(settings.base.resolve())
    for name in GRPC_SERVICES:
        env[f"SMA_{name.upper()}_PORT"] = str(settings.grpc_port(name))
        env[f"SMA_{name.upper()}_ADDR"] = ""  # the stack's own servers, whatever the shell says
    return env


def check_ports(settings: Settings) -> None:
    """Raise OSError naming the first port of the stack that is already taken."""
    ports = {"gateway": settings.port, **{n: settings.grpc_port(n) for n in GRPC_SERVICES}}
    if settings.metrics_port > 0:  # every service would serve /metrics on that one port here
        raise OSError(
            f"SMA_METRICS_PORT={settings.metrics_port} is one port for every service (a pod "
            "each, in a cluster); the stack runs them on one host: leave it 0 (each service's "
            "gRPC port + 1000) or -1 (none)"
        )
    if len(set(ports.values())) != len(ports):
        raise OSError(f"the stack's ports collide: {ports}")
    for name, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(
                socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
            )  # as servers do: TIME_WAIT is fine
            try:
                s.bind((settings.host, port))
            except OSError:
                raise OSError(
                    f"port {port} ({name}) on {settings.host} is taken: is another stack running? "
                    "use --port (the gRPC ports follow it) or SMA_*_PORT"
                ) from None


def up(settings: Settings) -> int:
    """Run the stack until Ctrl-C/SIGTERM. Returns the process exit code."""
    try:
        check_ports(settings)
        settings.tls()  # a missing or unreadable certificate stops us here, not four children
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    settings.home.mkdir(parents=True, exist_ok=True)
    env = stack_env(settings)
    children = [
        Child(name, [sys.executable, "-m", "shiftable.cli", "serve", name], env) for name in ORDER
    ]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    _record_pids(settings, children)
    scheme = "https" if settings.tls_cert else "http"
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    url = f"{scheme}://{_bracketed(host)}:{settings.port}/"
    # the probe asks our own child on this machine: no need to check whose certificate it is
    own = _unverified() if settings.tls_cert else None
    print(f"sma: starting the stack in {settings.home} (profile {settings.profile})", flush=True)
    announced, watch, polled = False, FirstStart(sys.stdout), 0.0
    while not stopping:
        time.sleep(0.2)
        if any(_supervise(child) for child in children):
            _record_pids(settings, children)
        if not announced and _answers(url + "health", own):
            print(f"sma: web UI and API on {url} (docs: {url}docs); Ctrl-C stops", flush=True)
            announced = True
        if announced and not watch.done and time.monotonic() - polled >= POLL_S:
            polled = time.monotonic()
            if (health := _health(url + "health", own)) is not None:
                watch.show(health)
    watch.end_line()
    print("sma: stopping", flush=True)
    _stop_all(children)
    return 0


class FirstStart:
    """The first start's progress in the terminal, from /health: on a terminal one line kept
    up to date (the phase's bar, then the whole start's percentage and ETA); in a log, a line
    for each phase and every tenth of the way. Then which model serves, once one does: the
    generalist, while the specialists train, and the whole model at the end."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.done = False
        self.phase = ""
        self.tenth = -1
        self.open_line = False
        self.early = ""  # the version that served while the first start went on

    def show(self, health: dict) -> None:
        op = health.get("first_start")
        if op is None:
            if health.get("initialized") and health.get("ready"):
                self.end_line()
                if self.phase:  # we watched it train
                    self._print(f"sma: model {health['serving_version']} serving", health)
                self.done = True
            return
        serving = health.get("loaded_version") if health.get("initialized") else None
        # once: the start's last version may load a moment before its operation ends
        if serving and not self.early:
            self.end_line()
            self._print(f"sma: model {serving} serving while the first start goes on", health)
            self.early = serving
        p = op["progress"]
        line = progress_line(p)
        if not self.phase and not serving:  # the first report, and nothing serves yet
            print(
                "sma: training the first model; the UI shows its progress, and /generate "
                "answers once it serves",
                file=self.out,
                flush=True,
            )
        if self.tty:
            self.out.write("\r" + line.ljust(100)[:100])
            self.out.flush()
            self.open_line = True
        elif p["phase"] != self.phase or int(p["percent"] // 10) > self.tenth:
            print(f"sma: first start: {line}", file=self.out, flush=True)
        self.phase, self.tenth = p["phase"] or "...", int(p["percent"] // 10)

    def _print(self, text: str, health: dict) -> None:
        specialists = ", ".join(health.get("specialists") or []) or "none"
        print(f"{text} (specialists: {specialists})", file=self.out, flush=True)

    def end_line(self) -> None:
        if self.open_line:
            self.out.write("\n")
            self.out.flush()
            self.open_line = False


def progress_line(p: dict) -> str:
    """`generalist [######......] 120/800 · 23% · ETA 4m 10s` from a progress object."""
    phase = p.get("phase") or "starting"
    parts = [phase]
    if p.get("total", 0) > 1:
        done = min(1.0, p["step"] / p["total"])
        filled = round(BAR * done)
        parts = [f"{phase} [{'#' * filled}{'.' * (BAR - filled)}] {p['step']}/{p['total']}"]
    parts.append(f"{p['percent']:.0f}%")
    if p.get("eta_s", 0) >= 1:
        parts.append(f"ETA {duration(p['eta_s'])}")
    return " · ".join(parts)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _supervise(child: Child) -> bool:
    """Restart a dead child when its back-off is over; True when it was restarted."""
    assert child.process is not None
    now = time.monotonic()
    if child.restart_at is not None:
        if now < child.restart_at:
            return False
        child.restarts += 1
        print(f"sma: restarting {child.name} (restart {child.restarts})", flush=True)
        child.start()
        return True
    code = child.process.poll()
    if code is None:
        return False
    lived = now - child.started
    child.backoff = 0.5 if lived > HEALTHY_AFTER_S else min(child.backoff * 2, 30.0)
    child.restart_at = now + child.backoff
    print(
        f"sma: {child.name} exited with code {code} after {lived:.1f} s; "
        f"restarting in {child.backoff:.1f} s",
        file=sys.stderr,
        flush=True,
    )
    return False


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _answers(url: str, trust: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0, context=trust) as response:
            return response.status == 200
    except OSError:
        return False


def _health(url: str, trust: ssl.SSLContext | None = None) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0, context=trust) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _stop_all(children: list[Child]) -> None:
    """SIGTERM in reverse order (gateway first), then SIGKILL whatever outlives the grace."""
    running = [c.process for c in reversed(children) if c.process and c.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    for process in running:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
