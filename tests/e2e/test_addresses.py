"""Each server on an address of its own, as pods are: they bind `SMA_HOST` and find each other
only through the dial settings (`SMA_REGISTRY_ADDR`, ... as host:port and as target URIs), with
two inference replicas behind one dial address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from bench.stack import free_port_block
from sma.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import synthetic_documents, train_tiny_home, write_domain
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.slow

HOSTS = {"registry": "127.0.0.2", "training": "127.0.0.3", "inference": "127.0.0.4"}
REPLICAS = {"infer-a": "127.0.0.4", "infer-b": "127.0.0.6"}
GATEWAY = "127.0.0.5"


def refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def test_servers_on_their_own_addresses_reach_each_other_by_the_dial_settings(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    train_tiny_home(home)  # a model on the shared volume: the gateway adopts it at boot
    port = free_port_block(1)  # one port number for all: each server has an address of its own
    env = {
        **os.environ,
        "SMA_HOME": str(home),
        "SMA_PROFILE": "tiny",
        "SMA_DEVICE": "cpu",
        "SMA_THREADS": "1",
        "SMA_PORT": str(port),
        **{f"SMA_{name.upper()}_PORT": str(port) for name in HOSTS},
        "SMA_REGISTRY_ADDR": f"{HOSTS['registry']}:{port}",
        "SMA_TRAINING_ADDR": f"ipv4:{HOSTS['training']}:{port}",
        "SMA_INFERENCE_ADDR": "ipv4:" + ",".join(f"{h}:{port}" for h in REPLICAS.values()),
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []
    try:
        servers = [
            ("registry", HOSTS["registry"], ""),
            ("training", HOSTS["training"], ""),
            *(("inference", host, replica) for replica, host in REPLICAS.items()),
            ("gateway", GATEWAY, ""),
        ]
        for name, host, replica in servers:
            with open(logs / f"{name}{replica}.log", "wb") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "shiftable", "serve", name],
                        env={**env, "SMA_HOST": host, "SMA_REPLICA_ID": replica},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        with httpx.Client(base_url=f"http://{GATEWAY}:{port}", timeout=30) as http:

            def ready() -> bool:
                assert all(p.poll() is None for p in processes), _tails(logs)
                try:
                    return http.get("/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, timeout=120)  # this gateway generates

            def both_loaded() -> dict | None:  # and both replicas serve what the registry does
                health = http.get("/health").json()
                return health if health["ready"] and len(health["replicas"]) == 2 else None

            health = wait_for(both_loaded, timeout=60)
            assert health["initialized"] and health["status"] == "ok", health
            assert {n: s["address"] for n, s in health["services"].items()} == {
                n: env[f"SMA_{n.upper()}_ADDR"] for n in HOSTS
            }
            before = {r: info(h, port) for r, h in REPLICAS.items()}
            assert {i.version_id for i in before.values()} == {health["serving_version"]}
            for _ in range(6):  # the gateway spreads calls over both replicas
                reply = http.post("/generate", json={"prompt": "the list", "max_new_tokens": 4})
                assert reply.status_code == 200, reply.text
                assert sorted(reply.json()["specialists"]) == ["dl", "ds"]
            after = {r: info(h, port) for r, h in REPLICAS.items()}
            assert all(after[r].requests_total > before[r].requests_total for r in REPLICAS)

            # an add succeeds once both replicas serve its version, not when the first does
            write_domain(home / "data", "web", synthetic_documents("dl", 20, seed=3))
            reply = http.post("/specialists", json={"name": "web"}, timeout=240)
            assert reply.status_code == 200, reply.text
            version = http.get("/health").json()["serving_version"]
            assert version != health["serving_version"]
            assert {info(h, port).version_id for h in REPLICAS.values()} == {version}
        # each bound its own address and only that: none took 127.0.0.1 (nor 0.0.0.0)
        assert all(not refused(host, port) for host in (*HOSTS.values(), *REPLICAS.values()))
        assert not refused(GATEWAY, port) and refused("127.0.0.1", port)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def info(host: str, port: int) -> inference_pb2.GetModelInfoResponse:
    """One replica's own account of itself, asked directly."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        return stub.GetModelInfo(inference_pb2.GetModelInfoRequest(), timeout=10)


def _tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.iterdir()))
