"""The serving stack's rendered manifests (deploy/stack), read the way a cluster would read them.

Helpers for tests/deploy/test_stack.py: which workload runs each `sma serve <service>`, the
environment its container gets (the ConfigMap through envFrom, then its own env), the `Settings`
that environment makes, which volume serves a path, and which connections the NetworkPolicies
admit. Anything these helpers cannot evaluate exactly (a label expression, a namespace selector)
is an error rather than a guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from unittest import mock

from bench.loopback import ManifestError, render
from shiftable.cli import build_parser
from shiftable_lib.config import Settings
from tests.deploy.manifests import DEPLOY

STACK = DEPLOY / "stack"
VARIANTS = [STACK / "base", *sorted(p for p in (STACK / "overlays").iterdir() if p.is_dir())]
SERVICES = ("registry", "training", "inference", "gateway")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Stack:
    """One rendered variant of the stack."""

    name: str
    objects: list[dict]

    @classmethod
    def render(cls, path: Path) -> Stack:
        return cls(path.name, render(path))

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        if len(found) != 1:
            raise ManifestError(f"{len(found)} objects {kind}/{name} in {self.name}")
        return found[0]

    def workloads(self) -> dict[str, dict]:
        """Service name -> the Deployment or StatefulSet whose container runs `sma serve` it."""
        found: dict[str, dict] = {}
        for workload in (o for o in self.objects if o["kind"] in WORKLOAD_KINDS):
            service = served(workload)
            if service in found:
                raise ManifestError(f"two workloads serve {service} in {self.name}")
            found[service] = workload
        return found

    def environment(self, workload: dict) -> dict[str, str]:
        """The SMA_* variables its container starts with: envFrom ConfigMaps in order, then env
        (which wins), as the kubelet builds them. A value from a Secret is left out."""
        env: dict[str, str] = {}
        spec = container(workload)
        for source in spec.get("envFrom", []):
            ref = source["configMapRef"]
            env.update(self.get("ConfigMap", ref["name"])["data"])
        env.update({e["name"]: e["value"] for e in spec.get("env", []) if "value" in e})
        return env

    def settings(self, workload: dict) -> Settings:
        return settings_from(self.environment(workload))

    def claim_names(self) -> set[str]:
        return {c["metadata"]["name"] for c in self.all("PersistentVolumeClaim")}


def settings_from(env: dict[str, str]) -> Settings:
    """`Settings()` as a process with exactly these SMA_* variables builds it."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SMA_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return Settings()


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload: dict) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def container(workload: dict) -> dict:
    """The one container of a workload's pods (the stack runs no sidecars)."""
    containers = pod(workload)["containers"]
    if len(containers) != 1:
        raise ManifestError(f"{workload['metadata']['name']}: {len(containers)} containers")
    return containers[0]


def served(workload: dict) -> str:
    """The service that `sma serve <service>`, its container's command, runs; parsed by sma's
    own parser, so a command it would refuse fails here."""
    command = container(workload).get("command", [])
    if command[:1] != ["sma"] or container(workload).get("args"):
        raise ManifestError(f"{workload['metadata']['name']}: command {command} is not `sma ...`")
    args = build_parser().parse_args(command[1:])
    if args.command != "serve":
        raise ManifestError(f"{workload['metadata']['name']}: runs `sma {args.command}`")
    return args.service


def container_port(workload: dict, port: int | str) -> int:
    """A port as a probe or a Service names it (a number, or a container port's name)."""
    ports = container(workload).get("ports", [])
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in ports if p.get("name") == port]
    if len(named) != 1:
        raise ManifestError(f"{workload['metadata']['name']}: no container port named {port!r}")
    return named[0]


def volume_at(workload: dict, path: Path | PurePosixPath) -> tuple[dict, dict]:
    """The (volume, mount) that holds `path` in the container: the deepest mount at or above it.
    A path under no mount is on the image's root filesystem."""
    target = PurePosixPath(path)
    mounts = [
        m
        for m in container(workload).get("volumeMounts", [])
        if target == PurePosixPath(m["mountPath"])
        or PurePosixPath(m["mountPath"]) in target.parents
    ]
    if not mounts:
        raise ManifestError(f"{workload['metadata']['name']}: nothing is mounted at {path}")
    mount = max(mounts, key=lambda m: len(PurePosixPath(m["mountPath"]).parts))
    volumes = {v["name"]: v for v in pod(workload).get("volumes", [])}
    templates = {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
    if mount["name"] in volumes:
        return volumes[mount["name"]], mount
    if mount["name"] in templates:
        return {"name": mount["name"], "volumeClaimTemplate": templates[mount["name"]]}, mount
    raise ManifestError(f"{workload['metadata']['name']}: no volume {mount['name']!r}")


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels only) picks a pod with `labels`."""
    unknown = set(selector) - {"matchLabels"}
    if unknown:
        raise ManifestError(f"selector fields these tests cannot evaluate: {sorted(unknown)}")
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def admits(
    policies: list[dict], source: dict[str, str] | None, dest: dict[str, str], port: int
) -> bool:
    """Whether a TCP connection to `port` of a pod labelled `dest` is let in, from a pod of the
    same namespace labelled `source`, or from outside the namespace (`source` None).

    NetworkPolicy semantics: a pod no policy selects takes anything; one that is selected takes
    only what some rule of a selecting policy allows (rules add up, none subtracts).
    """
    selecting = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], dest)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    return any(
        _port_matches(rule, port) and _source_matches(rule, source)
        for policy in selecting
        for rule in policy["spec"].get("ingress", [])
    )


def _port_matches(rule: dict, port: int) -> bool:
    ports = rule.get("ports") or []
    if not ports:
        return True
    for entry in ports:
        if entry.get("protocol", "TCP") != "TCP":
            continue
        if not isinstance(entry.get("port"), int):
            raise ManifestError(f"a policy port these tests cannot evaluate: {entry}")
        if entry["port"] <= port <= entry.get("endPort", entry["port"]):
            return True
    return False


def _source_matches(rule: dict, source: dict[str, str] | None) -> bool:
    peers = rule.get("from") or []
    if not peers:
        return True  # from anywhere, inside the namespace or out
    for peer in peers:
        if set(peer) != {"podSelector"}:
            raise ManifestError(f"a policy peer these tests cannot evaluate: {peer}")
        if source is not None and selects(peer["podSelector"], source):
            return True
    return False


def gpus(workload: dict) -> str | None:
    """The container's nvidia.com/gpu limit (where the device plugin reads it), if any."""
    return container(workload).get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
