"""TLS on a running stack (`sma up` with SMA_TLS_CERT, SMA_TLS_KEY, SMA_TLS_CA and mutual TLS
between services): the gateway answers HTTPS only, every gRPC server takes TLS connections only,
and only from clients whose certificate the stack's CA signed. The services dial each other
with TLS and present their certificate, so the stack itself trains and serves as before."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.stack import free_port_block
from sma.v1 import registry_pb2, registry_pb2_grpc
from tests.e2e.conftest import Stack, tiny_home

pytestmark = pytest.mark.slow


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(folder: Path, name: str, signer: tuple | None = None) -> tuple:
    """A key and certificate in `folder` (`name`.key, `name`.pem): a CA when `signer` is None,
    else a certificate for localhost and 127.0.0.1, for servers and clients, signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if signer is None:
        builder = builder.issuer_name(_name(name)).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        signing_key = key
    else:
        signing_key, ca = signer
        alt = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (
            builder.issuer_name(ca.subject)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, cert


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("certs")
    ca = issue(folder, "ca")
    issue(folder, "stack", ca)
    issue(folder, "stranger", issue(folder, "other-ca"))  # signed by a CA the stack does not trust
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Stack]:
    env = {
        "SMA_TLS_CERT": str(certs / "stack.pem"),
        "SMA_TLS_KEY": str(certs / "stack.key"),
        "SMA_TLS_CA": str(certs / "ca.pem"),
        "SMA_TLS_CLIENT_AUTH": "true",
    }
    running = Stack(tiny_home(tmp_path_factory.mktemp("tls")), env=env)
    running.url = f"https://127.0.0.1:{running.port}"
    trust = ssl.create_default_context(cafile=certs / "ca.pem")
    running.http = httpx.Client(base_url=running.url, timeout=120.0, verify=trust)
    running.start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def channel(address: str, certs: Path, client: str | None, ca: str = "ca") -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(certs / f"{ca}.pem").read_bytes(),
        private_key=(certs / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(certs / f"{client}.pem").read_bytes() if client else None,
    )
    return grpc.secure_channel(address, credentials)


def test_the_gateway_answers_https_only(stack: Stack) -> None:
    assert f"web UI and API on {stack.url}/" in stack.tail(400)  # `sma up` saw it answer
    reply = stack.http.post("/generate", json={"prompt": "the", "max_new_tokens": 4})
    assert reply.status_code == 200 and reply.json()["completion"] is not None
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the same port gets no answer
        httpx.get(f"http://127.0.0.1:{stack.port}/health", timeout=5.0)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{stack.url}/health", timeout=5.0)  # the system's roots do not know our CA


def test_every_grpc_server_takes_only_clients_our_ca_signed(stack: Stack, certs: Path) -> None:
    for service in ("registry", "training", "inference"):
        address = stack.grpc_address(service)
        check = health_pb2.HealthCheckRequest()
        with channel(address, certs, "stack") as good:
            reply = health_pb2_grpc.HealthStub(good).Check(check, timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        refused = [
            grpc.insecure_channel(address),  # no TLS
            channel(address, certs, None),  # TLS, but no client certificate
            channel(address, certs, "stranger"),  # a certificate from another CA
        ]
        for bad in refused:
            with bad, pytest.raises(grpc.RpcError) as info:
                health_pb2_grpc.HealthStub(bad).Check(check, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, service


def test_the_services_reach_each_other_over_mutual_tls(stack: Stack, certs: Path) -> None:
    """The first start itself crossed every link: training was asked for the version before
    the registry published it, and inference loaded it from the registry's pointer."""
    address = stack.grpc_address("registry")
    with channel(address, certs, "stack") as registry:
        serving = (
            registry_pb2_grpc.RegistryStub(registry)
            .GetServing(registry_pb2.GetServingRequest(), timeout=10)
            .serving
        )
    assert serving.version.id and serving.loaded_version_id == serving.version.id
    assert stack.health()["initialized"]


@pytest.mark.parametrize(
    "env, says",
    [
        ({"SMA_TLS_CERT": "stack.pem"}, "SMA_TLS_CERT is set without SMA_TLS_KEY"),
        ({"SMA_TLS_KEY": "stack.key"}, "SMA_TLS_KEY is set without SMA_TLS_CERT"),
        (
            {"SMA_TLS_CERT": "stack.pem", "SMA_TLS_KEY": "stack.key", "SMA_TLS_CLIENT_AUTH": "1"},
            "SMA_TLS_CLIENT_AUTH needs SMA_TLS_CA",
        ),
        ({"SMA_TLS_CERT": "absent.pem", "SMA_TLS_KEY": "stack.key"}, "SMA_TLS_CERT: cannot read"),
        ({"SMA_TLS_CERT": "stack.pem", "SMA_TLS_KEY": "README"}, "SMA_TLS_KEY: cannot read"),
    ],
)
def test_tls_settings_that_cannot_work_stop_the_stack_before_it_starts(
    tmp_path: Path, certs: Path, env: dict[str, str], says: str
) -> None:
    full = {k: str(certs / v) if k != "SMA_TLS_CLIENT_AUTH" else v for k, v in env.items()}
    command = [sys.executable, "-m", "shiftable", "up", "--home", str(tmp_path)]
    done = subprocess.run(
        [*command, "--port", str(free_port_block())],
        env={"PATH": "/usr/bin:/bin", **full},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert not (tmp_path / "state").exists()  # nothing started, nothing written
