"""Settings: where each server binds, and where its clients dial it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from shiftable_lib.config import GRPC_SERVICES, Settings, available_cpus


@pytest.fixture(autouse=True)
def no_stack_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HOST",
        "PORT",
        "METRICS_PORT",
        *(f"{s.upper()}_{k}" for s in GRPC_SERVICES for k in "PORT ADDR".split()),
    ):
        monkeypatch.delenv(f"SMA_{name}", raising=False)


def test_one_machine_binds_and_dials_the_same_ports() -> None:
    settings = Settings()
    for offset, service in enumerate(GRPC_SERVICES):
        assert settings.grpc_bind(service) == f"127.0.0.1:{50051 + offset}"
        assert settings.grpc_target(service) == settings.grpc_bind(service)
    moved = Settings(port=9000)
    assert [moved.grpc_target(s) for s in GRPC_SERVICES] == [
        "127.0.0.1:9001",
        "127.0.0.1:9002",
        "127.0.0.1:9003",
    ]


def test_each_grpc_server_has_a_metrics_port_of_its_own_on_one_machine() -> None:
    settings = Settings()
    assert [settings.metrics_port_of(s) for s in GRPC_SERVICES] == [51051, 51052, 51053]
    assert Settings(port=9000).metrics_port_of("inference") == 10003
    # a pod each: one port for all; -1: none; past the last port: none rather than a bad one
    assert {Settings(metrics_port=9090).metrics_port_of(s) for s in GRPC_SERVICES} == {9090}
    assert Settings(metrics_port=-1).metrics_port_of("registry") is None
    assert Settings(port=65000).metrics_port_of("inference") is None
    with pytest.raises(ValidationError):
        Settings(metrics_port=70000)


def test_the_stack_refuses_one_metrics_port_for_its_three_servers() -> None:
    from shiftable.stack import check_ports

    with pytest.raises(OSError, match="SMA_METRICS_PORT=9090 is one port for every service"):
        check_ports(Settings(metrics_port=9090))


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_bind_is_dialled_on_loopback(host: str) -> None:
    settings = Settings(host=host)
    bind = "0.0.0.0:50051" if host == "0.0.0.0" else "[::]:50051"
    assert settings.grpc_bind("registry") == bind
    assert settings.grpc_target("registry") == "127.0.0.1:50051"


def test_an_ipv6_host_gets_brackets() -> None:
    settings = Settings(host="::1", port=9000)
    assert settings.grpc_bind("inference") == settings.grpc_target("inference") == "[::1]:9003"


def test_dial_addresses_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMA_HOST", "0.0.0.0")
    monkeypatch.setenv("SMA_REGISTRY_ADDR", "registry:50051")
    monkeypatch.setenv("SMA_INFERENCE_ADDR", "dns:///inference-headless:50053")
    settings = Settings()
    assert settings.grpc_bind("inference") == "0.0.0.0:50053"  # binding is unchanged
    assert settings.grpc_target("registry") == "registry:50051"
    assert settings.grpc_target("inference") == "dns:///inference-headless:50053"
    assert settings.grpc_target("training") == "127.0.0.1:50052"  # not set: this host's own


@pytest.mark.parametrize(
    "target", ["10.0.0.7:50051", "[fd00::7]:50051", "ipv4:10.0.0.7:50051", "unix:/run/sma.sock"]
)
def test_host_port_and_target_uris_are_accepted(target: str) -> None:
    assert Settings(training_addr=target).grpc_target("training") == target


@pytest.mark.parametrize("target", ["registry", "registry:port", "http://registry:50051", "a b:1"])
def test_a_bad_dial_address_is_refused_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    monkeypatch.setenv("SMA_REGISTRY_ADDR", target)
    with pytest.raises(ValidationError, match=r"SMA_REGISTRY_ADDR=.* is not a gRPC address"):
        Settings()


@pytest.mark.parametrize(
    ("cpu_max", "cap"),
    [("max 100000\n", None), ("200000 100000\n", 2), ("150000 100000\n", 2), ("1000 100000", 1)],
)
def test_available_cpus_honours_a_cgroup_cpu_limit(
    tmp_path: Path, cpu_max: str, cap: int | None
) -> None:
    """A container's CPU limit (cgroup v2 cpu.max: quota and period), rounded up; none
    without a quota or without the file."""
    (tmp_path / "cpu.max").write_text(cpu_max)
    cores = len(os.sched_getaffinity(0))
    assert available_cpus(tmp_path / "cpu.max") == (min(cores, cap) if cap else cores)
    assert available_cpus(tmp_path / "missing") == cores


def test_the_decode_threads_leave_a_core_unless_a_model_is_bound_by_memory_bandwidth() -> None:
    cpus = available_cpus()
    auto = Settings(threads=0)
    assert auto.decode_threads() == max(1, cpus - 1)
    assert auto.decode_threads(bandwidth_bound=True) == cpus
    fixed = Settings(threads=3)  # SMA_THREADS: what it says, for every model
    assert fixed.decode_threads() == fixed.decode_threads(bandwidth_bound=True) == 3


def test_the_hosts_the_gateway_answers_to() -> None:
    assert Settings().hosts() == ["127.0.0.1", "::1", "localhost"]
    assert Settings(host="10.0.0.7").hosts() == ["10.0.0.7", "127.0.0.1", "::1", "localhost"]
    assert Settings(host="0.0.0.0").hosts() == ["*"]  # a pod's names are not known here
    named = Settings(host="0.0.0.0", allowed_hosts=" Shiftable.Example.org, gateway ,*.corp")
    assert named.hosts() == ["shiftable.example.org", "gateway", "*.corp"]
