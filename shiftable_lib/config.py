"""One settings object (env `SMA_*`) and the named training profiles it selects."""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shiftable_lib.auth import Keys


@dataclass(frozen=True)
class Profile:
    """Model size and training budget; a named preset, stored with every model version."""

    name: str
    # model
    vocab_size: int
    context: int
    n_layer: int
    n_head: int
    d_model: int
    # batches
    batch_size: int
    # generalist
    generalist_steps: int
    generalist_lr: float
    # specialists: each branch trains on its own domain for a number of steps proportional to
    # its corpus (epochs over its training tokens), clamped to [min, max]
    specialist_epochs: float
    specialist_min_steps: int
    specialist_max_steps: int
    specialist_lr: float
    # gate: trained after the branches, on batches that mix every domain
    gate_steps: int
    gate_lr: float
    # evaluation
    eval_interval: int
    eval_windows: int
    routing_documents: int
    dropout: float = 0.0
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 1337
    # the gate's loss counts general text this many times over a specialist's: sending general
    # text to a specialist costs general perplexity, the reverse only a specialist's gain, and
    # general (the standard library's docs) is the most varied domain (docs/benchmarks.md)
    gate_base_weight: float = 2.0
    # gate windows in tokens (0 = context): batch_size * context tokens a step, in shorter
    # windows, train the gate more often where it routes worst, at a window's start; the
    # profiles' windows are what the sweep in docs/benchmarks.md settled on for cpu and gpu
    gate_window: int = 0
    # the incremental add trains only the new row: its errors on the other domains' text cost
    # their perplexity, so those positions weigh `gate_replay_weight` more, and it takes
    # `gate_add_steps` (0 = gate_steps) to learn that from enough distinct windows, each step
    # `gate_add_batches` gate batches at once (on a GPU, whose gate step is bound by kernel
    # launches, four cost about twice what one does), at a peak rate of `gate_add_lr`
    # (0 = gate_lr): fewer steps move each token's score fewer times
    gate_replay_weight: float = 1.0
    # this share of each branch batch is general text: a branch that has seen only its own
    # text predicts anything else far worse than the base (an ASCII diagram in the general
    # text, for a branch of pydoc pages), so the little weight a gate sends it there costs a
    # lot (docs/model.md)
    branch_replay: float = 0.125
    gate_add_steps: int = 0
    gate_add_batches: int = 1
    gate_add_lr: float = 0.0

    @property
    def gate_window_tokens(self) -> int:
        """The length of a gate-training window."""
        return min(self.gate_window or self.context, self.context)

    @property
    def add_gate_steps(self) -> int:
        """Gate steps of an incremental add."""
        return self.gate_add_steps or self.gate_steps

    @property
    def gate_rows(self) -> int:
        """Windows in one gate step: `batch_size` contexts' worth of tokens."""
        return self.batch_size * self.context // self.gate_window_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


PROFILES: dict[str, Profile] = {
    # the smallest model that still trains every phase: for tests
    "tiny": Profile(
        name="tiny",
        vocab_size=384,
        context=64,
        n_layer=2,
        n_head=2,
        d_model=32,
        batch_size=8,
        generalist_steps=40,
        generalist_lr=3e-3,
        specialist_epochs=1.0,
        specialist_min_steps=10,
        specialist_max_steps=30,
        specialist_lr=3e-3,
        gate_steps=60,
        gate_lr=5e-2,
        eval_interval=20,
        eval_windows=4,
        routing_documents=8,
    ),
    # the whole demo (corpus, training, serving) on a machine with only a few CPU cores
    "cpu": Profile(
        name="cpu",
        vocab_size=4096,
        context=256,
        n_layer=4,
        n_head=4,
        d_model=128,
        batch_size=16,
        generalist_steps=800,
        generalist_lr=2e-3,
        specialist_epochs=1.0,
        specialist_min_steps=100,
        specialist_max_steps=400,
        specialist_lr=2e-3,
        gate_steps=300,
        gate_lr=5e-2,
        gate_window=64,
        gate_replay_weight=2.0,
        gate_add_steps=300,
        gate_add_lr=0.2,
        eval_interval=100,
        eval_windows=24,
        routing_documents=100,
    ),
    # a real GPU
    "gpu": Profile(
        name="gpu",
        vocab_size=8192,
        context=512,
        n_layer=8,
        n_head=8,
        d_model=512,
        batch_size=32,
        generalist_steps=2000,
        generalist_lr=6e-4,
        specialist_epochs=6.0,
        specialist_min_steps=200,
        specialist_max_steps=2000,
        specialist_lr=6e-4,
        gate_steps=600,
        gate_lr=5e-2,
        gate_window=128,
        gate_replay_weight=2.0,
        gate_add_steps=150,
        gate_add_batches=4,
        gate_add_lr=0.3,
        eval_interval=50,
        eval_windows=64,
        routing_documents=200,
        dropout=0.1,
    ),
    # GPT-2 small's shape: for corpora that outgrow `gpu`, and the multi-GPU training
    # benchmark (`python -m bench.train`)
    "gpt2-small": Profile(
        name="gpt2-small",
        vocab_size=16384,
        context=1024,
        n_layer=12,
        n_head=12,
        d_model=768,
        batch_size=16,
        generalist_steps=5000,
        generalist_lr=6e-4,
        specialist_epochs=4.0,
        specialist_min_steps=200,
        specialist_max_steps=2000,
        specialist_lr=3e-4,
        gate_steps=600,
        gate_lr=5e-2,
        gate_window=256,
        gate_replay_weight=2.0,
        gate_add_steps=1200,
        eval_interval=250,
        eval_windows=64,
        routing_documents=200,
    ),
}


def get_profile(name: str, **overrides: object) -> Profile:
    """The named profile, optionally with some fields replaced."""
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}") from None
    return replace(profile, **overrides) if overrides else profile


@dataclass(frozen=True)
class TLS:
    """PEM certificates, as Settings.tls() read them. `cert`/`key` are what servers here present
    (and clients too, with `client_auth`); `ca` what clients trust (None: the system's roots)."""

    cert: bytes
    key: bytes
    ca: bytes | None
    client_auth: bool
    cert_path: Path  # for servers that take files (uvicorn)
    key_path: Path

    def client(self) -> dict[str, bytes | None]:
        """grpc.ssl_channel_credentials' arguments: trust `ca`; present our certificate only
        for mutual TLS."""
        mine = self.client_auth
        return dict(
            root_certificates=self.ca,
            private_key=self.key if mine else None,
            certificate_chain=self.cert if mine else None,
        )


# the most an add or delete may be allowed to make another domain worse, in percent
MAX_DRIFT = 1000.0


def check_max_drift(value: float | None) -> float | None:
    """`value`, a drift limit in percent (None: the setting), or ValueError outside its range."""
    if value is not None and not 0 <= value <= MAX_DRIFT:
        raise ValueError(f"max_drift is a percentage from 0 to {MAX_DRIFT:g}, not {value}")
    return value


class Settings(BaseSettings):
    """Everything configurable, read once from the environment (`SMA_*`) and passed down."""

    model_config = SettingsConfigDict(env_prefix="SMA_", extra="ignore")

    home: Path = Field(default=Path("sma-home"), description="data, artifacts and state")
    profile: str = Field(default="cpu", description="tiny | cpu | gpu | gpt2-small")
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    base: Path | None = Field(
        default=None,
        description="a pretrained model (a Hugging Face directory or a .gguf file) that a "
        "first training imports as the generalist, instead of training one",
    )
    branch_rank: int = Field(
        default=64,
        ge=0,
        description="a specialist grown on an imported base: the rank of its delta on the "
        "base's attention projections (0: a full copy of them); fixed at the import",
    )
    threads: int = Field(
        default=0,
        description="CPU threads for torch; 0 = all cores (the decode worker: all but one)",
    )
    # the stack (`sma up`, `sma serve ...`): loopback unless told otherwise
    host: str = Field(default="127.0.0.1", description="address every server binds")
    port: int = Field(default=8000, description="gateway HTTP port")
    registry_port: int = Field(default=0, description="0 = derived from port (see grpc_port)")
    training_port: int = Field(default=0, description="0 = derived from port")
    inference_port: int = Field(default=0, description="0 = derived from port")
    # where the others are: each server binds `host`, but in a cluster it dials another pod
    registry_addr: str = Field(default="", description="registry to dial; '' = host:port here")
    training_addr: str = Field(default="", description="training to dial; '' = host:port here")
    inference_addr: str = Field(default="", description="inference to dial; '' = host:port here")
    metrics_port: int = Field(
        default=0,
        ge=-1,
        le=65535,
        description="HTTP port of each gRPC server's Prometheus /metrics: 0 = its gRPC port + "
        "1000, -1 = none (the gateway's is /metrics on its own port)",
    )
    replica_id: str = Field(
        default="",
        description="this server's id among its replicas (a pod's name); '' = the host name",
    )
    # who may call (shiftable_lib/auth.py): none set = nothing is checked
    api_key: str = Field(
        default="", repr=False, description="API keys that generate and read, comma-separated"
    )
    admin_key: str = Field(
        default="",
        repr=False,
        description="API keys that may also change things; the services present the first",
    )
    allowed_hosts: str = Field(
        default="",
        description="Host names the gateway answers to, comma-separated ('*' = any, '*.x.org' "
        "= its subdomains); '' = the loopback names and SMA_HOST, or any when SMA_HOST is a "
        "wildcard",
    )
    cors_origins: str = Field(
        default="", description="origins whose pages may call the API, comma-separated; '' = none"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="servers' log lines: text, or one JSON object a line"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="the least severe log lines the servers write"
    )
    max_drift: float = Field(
        default=0.5,
        ge=0.0,
        le=MAX_DRIFT,
        description="percent: an add or delete that makes another domain's held-out perplexity "
        "worse than this is not published (a request may ask for another limit)",
    )
    max_streams_per_client: int = Field(
        default=64,
        ge=0,
        description="generations one client (its API key, else its address) may run at once "
        "through one gateway; 0 = no limit",
    )
    # TLS: off unless a certificate is given (docs/configuration.md)
    tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) the servers here present: the gateway's HTTPS and "
        "every gRPC server; set = every gRPC client here dials with TLS too",
    )
    tls_key: Path | None = Field(default=None, description="PEM private key of SMA_TLS_CERT")
    tls_ca: Path | None = Field(
        default=None,
        description="PEM CA certificates trusted for the gRPC servers dialled (and, with client "
        "auth, for the clients); unset = the system's",
    )
    tls_client_auth: bool = Field(
        default=False,
        description="mutual TLS between services: gRPC servers require a client certificate "
        "signed by SMA_TLS_CA, and clients present SMA_TLS_CERT",
    )
    max_batch: int = Field(default=32, ge=1, description="sequences decoded together")
    max_queue: int = Field(default=64, ge=0, description="requests waiting beyond max_batch")
    serve_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="the inference server's weights and KV cache: auto = bfloat16 on a GPU, "
        "and on a CPU with bfloat16 instructions for a model of over 16 MiB of float32 "
        "weights; float32 otherwise",
    )
    cuda_graphs: bool = Field(
        default=True, description="replay the decode step from CUDA graphs on a GPU; off = eager"
    )
    train_threads: int = Field(default=0, description="torch threads in training jobs; 0 = all")
    nproc_per_node: int = Field(default=1, ge=1, description="training processes per host")

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def models_dir(self) -> Path:
        return self.home / "artifacts" / "models"

    @property
    def state_dir(self) -> Path:
        return self.home / "state"

    def decode_threads(self, bandwidth_bound: bool = False) -> int:
        """Torch threads of the inference worker: `threads`, else every core but one, or every
        core for a model whose decode is `bandwidth_bound`.

        The core left over runs the gRPC server, the gateway and their clients while the worker
        decodes, so the per-token hand-offs never preempt a decode step. Where cores are few,
        one thread also decodes faster than more, a single stream and a full batch alike, since
        with one thread decode attention is the compiled loop. A model large enough to be
        served in bfloat16 on a CPU (`checkpoint.serving_dtype`) streams its weights from
        memory each step, and more threads draw more bandwidth: there every core pays for the
        preemptions (docs/benchmarks.md).
        """
        if self.threads:
            return self.threads
        return available_cpus() if bandwidth_bound else max(1, available_cpus() - 1)

    def keys(self) -> Keys:
        """The API keys and their scopes; ValueError naming the setting of a malformed key."""
        return Keys.parse(self.api_key, self.admin_key)

    def tls(self) -> TLS | None:
        """The certificates, read now; None without SMA_TLS_CERT. ValueError naming the setting
        that is missing or unreadable."""
        if self.tls_cert is None:
            for name in ("tls_key", "tls_ca"):
                if getattr(self, name) is not None:
                    raise ValueError(f"SMA_{name.upper()} is set without SMA_TLS_CERT")
            if self.tls_client_auth:
                raise ValueError("SMA_TLS_CLIENT_AUTH needs SMA_TLS_CERT, SMA_TLS_KEY, SMA_TLS_CA")
            return None
        if self.tls_key is None:
            raise ValueError("SMA_TLS_CERT is set without SMA_TLS_KEY")
        if self.tls_client_auth and self.tls_ca is None:
            raise ValueError("SMA_TLS_CLIENT_AUTH needs SMA_TLS_CA: the CA that signs the clients")

        def read(name: str) -> bytes:
            path = getattr(self, name)
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"SMA_{name.upper()}: cannot read {path} ({exc})") from None
            if b"-----BEGIN " not in pem:
                raise ValueError(f"SMA_{name.upper()}: {path} is not a PEM file")
            return pem

        return TLS(
            cert=read("tls_cert"),
            key=read("tls_key"),
            ca=read("tls_ca") if self.tls_ca else None,
            client_auth=self.tls_client_auth,
            cert_path=self.tls_cert,
            key_path=self.tls_key,
        )

    def hosts(self) -> list[str]:
        """The Host names the gateway answers to (without ports); ["*"] for any."""
        if self.allowed_hosts.strip():
            return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]
        if self.host in WILDCARD_HOSTS:  # a pod's or a machine's every address: names unknown here
            return ["*"]
        return sorted({"localhost", "127.0.0.1", "::1", self.host.lower()})

    def replica(self) -> str:
        """This server's id among its replicas: what an inference replica reports to the
        registry under, and what a gateway's operation leases are held in the name of."""
        return self.replica_id or socket.gethostname()

    def grpc_port(self, service: str) -> int:
        """The gRPC port of `registry`, `training` or `inference`.

        Set explicitly (`SMA_REGISTRY_PORT`, ...) or derived from the gateway port so that two
        stacks with different `--port`s never collide: 50051-50053 for the default port 8000,
        else port+1 .. port+3.
        """
        offset = GRPC_SERVICES.index(service)
        explicit = getattr(self, f"{service}_port")
        if explicit:
            return explicit
        return (50051 if self.port == 8000 else self.port + 1) + offset

    def metrics_port_of(self, service: str) -> int | None:
        """The HTTP port of `service`'s /metrics: `SMA_METRICS_PORT` (one port for every
        service: in a cluster each pod has its own address), else its gRPC port + 1000; None
        when there is none."""
        if self.metrics_port == -1:
            return None
        port = self.metrics_port or self.grpc_port(service) + 1000
        return port if port <= 65535 else None

    def grpc_bind(self, service: str) -> str:
        """Where the `service` server listens: `host` and its gRPC port."""
        return _host_port(self.host, self.grpc_port(service))

    def grpc_target(self, service: str) -> str:
        """Where clients dial `service`: `SMA_<SERVICE>_ADDR` (`host:port`, or a gRPC target
        URI such as `dns:///inference-headless:50053`), else this host's own server. A wildcard
        bind address (0.0.0.0, ::) is dialled on loopback."""
        explicit = getattr(self, f"{service}_addr")
        if explicit:
            return explicit
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return _host_port(host, self.grpc_port(service))

    @field_validator("registry_addr", "training_addr", "inference_addr")
    @classmethod
    def _check_target(cls, value: str, info: ValidationInfo) -> str:
        value = value.strip()
        if value and not (TARGET_URI.match(value) or HOST_PORT.match(value)):
            raise ValueError(
                f"SMA_{info.field_name.upper()}={value!r} is not a gRPC address: give host:port "
                "(inference:50053, [::1]:50053) or a target URI (dns:///inference-headless:50053)"
            )
        return value


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# gRPC's target URIs (scheme:[//authority/]endpoint) of the schemes grpcio resolves
TARGET_URI = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds):\S+$")
HOST_PORT = re.compile(r"^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}$")


GRPC_SERVICES = ("registry", "training", "inference")


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: those it may run on, capped by its cgroup's CPU quota (a
    container's CPU limit, which torch's own count, the machine's cores, does not see)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return cpus
