"""deploy/stack: the serving stack (registry, training, inference, gateway) on Kubernetes.

Every variant (the base and each overlay) is rendered with kustomize and each object validated
offline, strictly (tests/deploy/manifests.py). Then the manifests are checked against the code
they run: the command of each workload, the ports and addresses its `Settings` make from the
ConfigMap and its env, the probes against the gRPC services' names and the gateway's routes, the
volumes against the folders the code reads and writes, and the NetworkPolicies against who dials
whom.
"""

from __future__ import annotations

import copy
import re
from pathlib import PurePosixPath

import pytest
from kubernetes.utils import parse_quantity
from starlette.routing import Match

from bench.loopback import ManifestError, render
from gateway.app import MAX_BODY, create_app
from gateway.routes import health
from services.inference.server import SERVICE_NAME as INFERENCE
from services.registry.server import SERVICE_NAME as REGISTRY
from services.training.server import SERVICE_NAME as TRAINING
from shiftable_lib.config import GRPC_SERVICES, WILDCARD_HOSTS, Settings, get_profile
from tests.deploy.manifests import DEPLOY, validate
from tests.deploy.stack import (
    SERVICES,
    VARIANTS,
    Stack,
    admits,
    container,
    container_port,
    gpus,
    pod,
    pod_labels,
    selects,
    volume_at,
)

HEALTH_NAMES = {"registry": REGISTRY, "training": TRAINING, "inference": INFERENCE}
# who dials whom, in the code: the gateway every gRPC service, inference the registry (the
# serving version it follows), the registry training (whether a version exists), training nobody
DIALS = {
    "gateway": set(GRPC_SERVICES),
    "inference": {"registry"},
    "registry": {"training"},
    "training": set(),
}
NGINX_UNITS = {"k": 1024, "m": 1024**2}
KINDS = {
    "ConfigMap": 1,
    "PersistentVolumeClaim": 1,
    "StatefulSet": 1,
    "Deployment": 3,
    "Service": 4,
    "HorizontalPodAutoscaler": 1,
    "PodDisruptionBudget": 2,
    "Ingress": 1,
    "NetworkPolicy": 5,
}


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda p: p.name)
def stack(request: pytest.FixtureRequest) -> Stack:
    return Stack.render(request.param)


@pytest.fixture(scope="module")
def base() -> Stack:
    return Stack.render(VARIANTS[0])


def port_of(service: str, settings: Settings) -> int:
    """The port `sma serve <service>` listens on with these settings."""
    return settings.port if service == "gateway" else settings.grpc_port(service)


def test_every_object_is_valid_against_its_schema(stack: Stack) -> None:
    kinds = {kind: len(stack.all(kind)) for kind in {o["kind"] for o in stack.objects}}
    assert kinds == KINDS
    for obj in stack.objects:
        validate(obj)
    assert not stack.all("Secret"), "the API key's Secret is the operator's, never rendered"


def _container(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "says"),
    [
        ("StatefulSet", "registry",
         lambda o: _container(o)["readinessProbe"]["grpc"].update(port="grpc"),
         "'grpc' is not of type 'integer'"),
        ("StatefulSet", "registry",
         lambda o: o["spec"]["volumeClaimTemplates"][0]["spec"].update(accessMode=["x"]),
         "'accessMode' was unexpected"),
        ("Deployment", "inference",
         lambda o: _container(o)["securityContext"].update(readOnlyRootFS=True),
         "'readOnlyRootFS' was unexpected"),
        ("Deployment", "gateway",
         lambda o: _container(o)["env"][0]["valueFrom"]["secretKeyRef"].update(optional="true"),
         "'true' is not of type 'boolean'"),
        ("Deployment", "training",
         lambda o: _container(o)["resources"]["limits"].update(memory="8 GB"),
         "'8 GB' is not a quantity"),
        ("HorizontalPodAutoscaler", "gateway", lambda o: o["spec"].update(maxReplicas="1"),
         "'1' is not of type 'integer'"),
        ("Ingress", "gateway", lambda o: o["spec"]["rules"][0]["http"]["paths"][0].pop("pathType"),
         "'pathType' is a required property"),
        ("NetworkPolicy", "registry", lambda o: o["spec"]["ingress"][0].update(to=[]),
         "'to' was unexpected"),
        ("Service", "inference-headless", lambda o: o["spec"].update(clusterIp="None"),
         "'clusterIp' was unexpected"),
        ("ConfigMap", "sma-config", lambda o: o["data"].update(SMA_PORT=8000),
         "8000 is not of type 'string'"),
    ],
)  # fmt: skip
def test_validation_refuses_what_a_cluster_would(
    base: Stack, kind: str, name: str, mutate, says: str
) -> None:
    obj = copy.deepcopy(base.get(kind, name))
    mutate(obj)
    with pytest.raises(ManifestError, match=re.escape(says)):
        validate(obj)


def test_each_workload_runs_sma_serve_its_service_from_one_image(stack: Stack) -> None:
    workloads = stack.workloads()  # parses every command with sma's own parser
    assert sorted(workloads) == sorted(SERVICES)
    assert {s: w["metadata"]["name"] for s, w in workloads.items()} == {s: s for s in SERVICES}
    (image,) = {container(w)["image"] for w in workloads.values()}
    # the CPU-only build for the cpu overlay (docs/deploy.md), else the CUDA one
    assert image == ("shiftable:cpu" if stack.name == "cpu" else "shiftable:latest")
    assert workloads["registry"]["kind"] == "StatefulSet"


def test_each_container_listens_where_its_settings_say(stack: Stack) -> None:
    for service, workload in stack.workloads().items():
        settings = stack.settings(workload)
        assert settings.host in WILDCARD_HOSTS, f"{service} must listen on the pod's interfaces"
        ports = [p["containerPort"] for p in container(workload)["ports"]]
        metrics = [] if service == "gateway" else [settings.metrics_port_of(service)]
        assert ports == [port_of(service, settings), *metrics], service
        for other in GRPC_SERVICES:  # explicit: a derived port would follow SMA_PORT silently
            assert getattr(settings, f"{other}_port"), f"SMA_{other.upper()}_PORT is not set"
        get_profile(settings.profile)  # a profile the code knows


def test_every_address_dialled_is_a_service_of_the_stack(stack: Stack) -> None:
    workloads = stack.workloads()
    services = {s["metadata"]["name"]: s for s in stack.all("Service")}
    for dialer, targets in DIALS.items():
        settings = stack.settings(workloads[dialer])
        for target in targets:
            address = settings.grpc_target(target)
            scheme, _, endpoint = address.rpartition(":///")
            host, _, port = endpoint.rpartition(":")
            service = services.get(host.split(".")[0])
            assert service is not None, f"{dialer} dials {address}: no Service {host!r}"
            (entry,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
            backends = [
                s
                for s, w in workloads.items()
                if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
            ]
            assert backends == [target], f"{address} reaches {backends}, not {target}"
            listens = port_of(target, stack.settings(workloads[target]))
            assert container_port(workloads[target], entry["targetPort"]) == listens
            if target == "inference":  # one address per replica, for the round-robin channel
                assert service["spec"].get("clusterIP") == "None"
                assert scheme == "dns"


def probe_target(workload: dict, probe: dict) -> tuple[int, str | None]:
    """The port a probe asks, and the gRPC health service it asks for (None: a TCP connect)."""
    if "grpc" in probe:
        return probe["grpc"]["port"], probe["grpc"].get("service", "")
    return container_port(workload, probe["tcpSocket"]["port"]), None


def test_grpc_probes_ask_each_server_on_its_port(stack: Stack) -> None:
    for service, name in HEALTH_NAMES.items():
        workload = stack.workloads()[service]
        spec, port = container(workload), port_of(service, stack.settings(workload))
        asks = {
            kind: probe_target(workload, spec[kind])
            for kind in ("readinessProbe", "livenessProbe", "startupProbe")
            if kind in spec
        }
        for kind, (probed, health_name) in asks.items():
            assert probed == port, f"{service} {kind}"
            assert health_name in ("", name, None), f"{service} {kind} asks for {health_name}"
        assert asks["readinessProbe"][1] is not None, f"{service}: ready means SERVING"
        # inference is NOT_SERVING until it has loaded a version, which on a fresh home waits
        # for the first training: a gRPC liveness or start-up probe would kill every replica
        # meanwhile. The others are SERVING within a second of starting.
        alive = [asks[kind][1] for kind in ("livenessProbe", "startupProbe") if kind in asks]
        if service == "inference":
            assert alive and all(a is None for a in alive), alive
        else:
            assert asks["livenessProbe"][1] is not None, f"{service}: a gRPC liveness probe"


def test_the_gateways_http_probes_are_its_health_routes(stack: Stack) -> None:
    workload = stack.workloads()["gateway"]
    settings = stack.settings(workload)
    app = create_app(settings)  # built, not started: no lifespan, no connection
    spec = container(workload)
    expected = {
        "livenessProbe": app.url_path_for(health.livez.__name__),
        "readinessProbe": app.url_path_for(health.readyz.__name__),
    }
    for kind, path in expected.items():
        probe = spec[kind]["httpGet"]
        assert probe["path"] == path, kind
        assert container_port(workload, probe["port"]) == settings.port
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "headers": []}
        assert any(route.matches(scope)[0] is Match.FULL for route in app.routes), path


def test_volumes_hold_what_each_service_reads_and_writes(stack: Stack) -> None:
    (home,) = stack.all("PersistentVolumeClaim")
    assert home["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes mount it
    shared = home["metadata"]["name"]
    workloads = stack.workloads()

    def claim(service: str, path) -> tuple[str | None, bool]:
        volume, mount = volume_at(workloads[service], path)
        pvc = volume.get("persistentVolumeClaim")
        read_only = mount.get("readOnly", False) or (pvc or {}).get("readOnly", False)
        return (pvc["claimName"] if pvc else None), read_only

    registry = stack.settings(workloads["registry"])
    volume, _ = volume_at(workloads["registry"], registry.state_dir)
    assert volume["volumeClaimTemplate"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert workloads["registry"]["spec"]["replicas"] == 1  # one SQLite writer
    for service, writes in (("training", True), ("inference", False)):
        settings = stack.settings(workloads[service])
        for folder in (settings.data_dir, settings.models_dir):
            name, read_only = claim(service, folder)
            assert name == shared, f"{service}: {folder} is not on the shared claim"
            assert read_only is not writes, f"{service}: {folder} read-only is {read_only}"
    claims = {
        service: {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod(workload).get("volumes", [])
            if "persistentVolumeClaim" in v
        }
        for service, workload in workloads.items()
    }
    # the gateway reads no file of the home; the registry has only its own claim (above)
    assert claims == {"registry": set(), "training": {shared}, "inference": {shared},
                      "gateway": set()}  # fmt: skip
    for service, workload in workloads.items():  # a read-only root: tempfile needs /tmp
        assert "emptyDir" in volume_at(workload, PurePosixPath("/tmp/x"))[0], service


def test_every_container_runs_unprivileged_with_a_read_only_root(stack: Stack) -> None:
    """What the `restricted` Pod Security Standard asks, and a read-only root besides."""
    for service, workload in stack.workloads().items():
        security = pod(workload)["securityContext"]
        assert security["runAsNonRoot"] and security["runAsUser"] == 1000, service
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, service
        spec = container(workload)["securityContext"]
        assert spec["allowPrivilegeEscalation"] is False, service
        assert spec["capabilities"] == {"drop": ["ALL"]}, service
        assert spec["readOnlyRootFilesystem"] is True, service


def test_requests_limits_and_threads_fit_each_pod(stack: Stack) -> None:
    for service, workload in stack.workloads().items():
        resources = container(workload)["resources"]
        for what in ("cpu", "memory"):
            request = parse_quantity(resources["requests"][what])
            assert request <= parse_quantity(resources["limits"][what]), f"{service} {what}"
        cpus = parse_quantity(resources["limits"]["cpu"])
        settings = stack.settings(workload)
        # torch counts the node's cores, not the pod's share: a thread count left at 0 would
        # start one thread per core of the node in a pod with a few CPUs
        if service == "inference":
            assert 0 < settings.decode_threads() <= cpus
            assert 0 < settings.decode_threads(bandwidth_bound=True) <= cpus
        if service == "training":
            assert 0 < settings.train_threads <= cpus


def test_network_policies_admit_exactly_who_dials_whom(stack: Stack) -> None:
    workloads = stack.workloads()
    policies = stack.all("NetworkPolicy")
    labels = {s: pod_labels(w) for s, w in workloads.items()}
    for dest, workload in workloads.items():
        port = port_of(dest, stack.settings(workload))
        for source in [*SERVICES, None]:  # None: from outside the namespace
            allowed = admits(policies, labels.get(source), labels[dest], port)
            if dest == "gateway":
                wanted = True  # the HTTP API, through the ingress controller
            else:
                wanted = source is not None and dest in DIALS.get(source, set())
            assert allowed is wanted, f"{source or 'outside'} -> {dest}:{port}"
            assert not admits(policies, labels.get(source), labels[dest], 9999), dest


def metrics_port_of(service: str, settings: Settings) -> int | None:
    """Where `sma serve <service>` answers /metrics with these settings."""
    return settings.port if service == "gateway" else settings.metrics_port_of(service)


def test_prometheus_finds_every_services_metrics(stack: Stack) -> None:
    """The scrape annotations and the PodMonitor name, for each pod, the port its settings
    serve /metrics on, and the network policies let a scrape in from outside the namespace."""
    (monitor,) = render(DEPLOY / "stack" / "monitoring")
    assert monitor["kind"] == "PodMonitor"
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    policies = stack.all("NetworkPolicy")
    for service, workload in stack.workloads().items():
        settings = stack.settings(workload)
        port = metrics_port_of(service, settings)
        assert port is not None, f"{service} serves no /metrics"
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true", service
        assert int(annotations["prometheus.io/port"]) == port, service
        assert annotations["prometheus.io/path"] == "/metrics", service
        named = {p["name"]: p["containerPort"] for p in container(workload)["ports"]}
        assert selects(monitor["spec"]["selector"], pod_labels(workload)), service
        assert any(named.get(name) == port for name in endpoints), service
        assert all(path == "/metrics" for path in endpoints.values())
        assert admits(policies, None, pod_labels(workload), port), f"outside -> {service}:{port}"


def test_only_training_and_inference_get_gpus(stack: Stack) -> None:
    workloads = stack.workloads()
    on_gpu = stack.name == "gpu"
    for service, workload in workloads.items():
        if on_gpu and service in ("training", "inference"):
            assert gpus(workload) == "1", service
            assert stack.settings(workload).device == "cuda", service
        else:
            assert gpus(workload) is None, service
            if service in ("training", "inference"):
                assert stack.settings(workload).device == "cpu", service
        assert "nvidia.com/gpu" not in container(workload)["resources"].get("requests", {})
    profile = stack.settings(workloads["gateway"]).profile  # the gateway asks for a first training
    assert profile == stack.settings(workloads["training"]).profile == ("gpu" if on_gpu else "cpu")


def test_replicas_and_updates_fit_what_the_code_can_share(stack: Stack) -> None:
    workloads = stack.workloads()
    assert workloads["training"]["spec"]["replicas"] == 1  # one job runner
    assert workloads["training"]["spec"]["strategy"] == {"type": "Recreate"}
    assert workloads["inference"]["spec"]["replicas"] >= 2
    gateway = workloads["gateway"]
    # gateways share operations through leases in the registry: two or more, rolled one by one
    assert gateway["spec"]["replicas"] >= 2
    assert gateway["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    (hpa,) = stack.all("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= gateway["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container(gateway)["resources"]["requests"]  # utilization is of the request
    budgets = {
        s: [b["metadata"]["name"] for b in stack.all("PodDisruptionBudget")
            if selects(b["spec"]["selector"], pod_labels(w))]
        for s, w in workloads.items()
    }  # fmt: skip
    assert budgets == {"registry": [], "training": [], "inference": ["inference"],
                       "gateway": ["gateway"]}  # fmt: skip


def test_the_ingress_streams_to_the_gateway(stack: Stack) -> None:
    (ingress,) = stack.all("Ingress")
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    backend = path["backend"]["service"]
    service = stack.get("Service", backend["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["name"] == backend["port"]["name"]]
    gateway = stack.workloads()["gateway"]
    assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels(gateway))
    assert container_port(gateway, port["targetPort"]) == stack.settings(gateway).port
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off"  # SSE tokens as they come
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[prefix + timeout]) >= 3600
    size = notes[prefix + "proxy-body-size"]  # nginx's sizes: k and m are powers of 1024
    assert int(size[:-1]) * NGINX_UNITS[size[-1]] == MAX_BODY  # past it, nginx answers 413 too


def test_the_api_keys_come_from_an_optional_secret(stack: Stack) -> None:
    """Every service checks the keys and presents the admin key to the others; without the
    Secret the stack still starts (and checks nothing)."""
    for service, workload in stack.workloads().items():
        env = {e["name"]: e for e in container(workload).get("env", [])}
        for variable, key in (("SMA_API_KEY", "api-key"), ("SMA_ADMIN_KEY", "admin-key")):
            ref = env[variable]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "sma-api-key", "key": key, "optional": True}, service
    assert not stack.all("Secret")  # never rendered: its values are the operator's


def test_the_training_job_shares_the_stacks_home_and_settings(base: Stack) -> None:
    """The multi-host PyTorchJob trains in the stack's claim, with the stack's ConfigMap."""
    (home,) = base.all("PersistentVolumeClaim")
    (config,) = base.all("ConfigMap")
    job_objects = render(DEPLOY / "training-job" / "base")
    (claim,) = [o for o in job_objects if o["kind"] == "PersistentVolumeClaim"]
    (job,) = [o for o in job_objects if o["kind"] == "PyTorchJob"]
    assert claim["metadata"]["name"] == home["metadata"]["name"] and claim["spec"] == home["spec"]
    assert not [o for o in job_objects if o["kind"] == "ConfigMap"], "the stack owns its config"
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        spec = replica["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        for each in spec["containers"] + spec.get("initContainers", []):
            assert each["envFrom"] == [
                {"configMapRef": {"name": config["metadata"]["name"], "optional": True}}
            ]
            env = {e["name"]: e["value"] for e in each["env"] if "value" in e}
            assert env["SMA_HOME"] == config["data"]["SMA_HOME"]
            mounts = {m["mountPath"]: m["name"] for m in each["volumeMounts"]}
            claim_name = volumes[mounts[env["SMA_HOME"]]]["persistentVolumeClaim"]["claimName"]
            assert claim_name == home["metadata"]["name"]
