"""Offline checks of the manifests in deploy/: render them with kustomize, validate every object.

- Kubernetes' own kinds are validated by `kubernetes-validate` against the JSON schema of
  `KUBERNETES_VERSION`, strictly (an unknown field is an error).
- Kubeflow's kinds (PyTorchJob) are walked field by field against the Training Operator's API
  models (the `kubeflow-training` SDK, generated from the operator's OpenAPI spec), down into the
  Kubernetes models they embed: an unknown field, a wrong type or a missing required field is an
  error. Their pod templates are then validated as Kubernetes PodTemplates as above.

Nothing here talks to a cluster.
"""

from __future__ import annotations

import re

import kubernetes.client.models as k8s_models
import kubernetes_validate
from kubeflow.training import models as kubeflow_models
from kubernetes.utils import parse_quantity

from bench.loopback import ROOT, ManifestError

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"
KUBEFLOW_KINDS = {"PyTorchJob": "KubeflowOrgV1PyTorchJob"}
# what the SDK models type as plain strings and ints, as the Training Operator's API defines it
KUBEFLOW_API = "kubeflow.org/v1"
REPLICA_TYPES = {"Master", "Worker"}
RESTART_POLICIES = {"Always", "OnFailure", "Never", "ExitCode"}
CLEAN_POD_POLICIES = {"All", "Running", "None"}
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # RFC 1123 label: pods derive from it
PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
}


def validate(obj: dict) -> None:
    """Raise ManifestError on the first thing wrong with one rendered object."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if str(obj.get("apiVersion", "")).startswith("kubeflow.org/"):
        model = KUBEFLOW_KINDS.get(obj["kind"])
        if model is None or obj["apiVersion"] != KUBEFLOW_API:
            raise ManifestError(f"{name}: no schema known for {obj['apiVersion']} {obj['kind']}")
        check(obj, model, name)
        _operator_rules(obj, name)
        for role, replica in obj["spec"].get("pytorchReplicaSpecs", {}).items():
            template = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{name}-{role}".lower().replace("/", "-")},
                "template": replica["template"],
            }
            _kubernetes(template, f"{name} {role} pod template")
    else:
        _kubernetes(obj, name)


def _operator_rules(job: dict, name: str) -> None:
    """The Training Operator's own constraints on fields the models leave as str and int."""
    if not DNS_NAME.match(job["metadata"]["name"]):
        raise ManifestError(f"{name}: the name must be a lowercase RFC 1123 label")
    clean = job["spec"].get("runPolicy", {}).get("cleanPodPolicy", "None")
    if clean not in CLEAN_POD_POLICIES:
        raise ManifestError(f"{name}: cleanPodPolicy {clean!r} is not one of {CLEAN_POD_POLICIES}")
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        where = f"{name} {role}"
        if role not in REPLICA_TYPES:
            raise ManifestError(f"{where}: replica type must be one of {REPLICA_TYPES}")
        if replica.get("restartPolicy", "Never") not in RESTART_POLICIES:
            raise ManifestError(f"{where}: restartPolicy is not one of {RESTART_POLICIES}")
        if replica.get("replicas", 1) < 1:
            raise ManifestError(f"{where}: replicas must be at least 1")


def _kubernetes(obj: dict, name: str) -> None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = "/".join(str(p) for p in e.path)
        raise ManifestError(f"{name}: {where}: {e.message}") from None
    _quantities(obj, name)


def _quantities(value: object, path: str) -> None:
    """Every resource request and limit parses as a Kubernetes quantity (the schema only says
    int-or-string)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _quantities(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("requests", "limits") and isinstance(item, dict):
                for resource, amount in item.items():
                    try:
                        parse_quantity(amount)
                    except ValueError:
                        raise ManifestError(
                            f"{path}.{key}.{resource}: {amount!r} is not a quantity"
                        ) from None
            else:
                _quantities(item, f"{path}.{key}")


def check(value: object, type_name: str, path: str) -> None:
    """`value` against an OpenAPI model type name of the generated SDKs, strictly."""
    if type_name.startswith("list["):
        if not isinstance(value, list):
            raise ManifestError(f"{path}: expected a list, got {value!r}")
        for i, item in enumerate(value):
            check(item, type_name[5:-1], f"{path}[{i}]")
    elif type_name.startswith("dict("):
        if not isinstance(value, dict):
            raise ManifestError(f"{path}: expected a mapping, got {value!r}")
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        for key, item in value.items():
            check(item, inner, f"{path}.{key}")
    elif type_name == "object":
        return
    elif type_name in PRIMITIVES:
        bad_bool = isinstance(value, bool) and type_name != "bool"
        if bad_bool or not isinstance(value, PRIMITIVES[type_name]):
            raise ManifestError(f"{path}: expected {type_name}, got {value!r}")
    else:
        _check_model(value, type_name, path)


def _check_model(value: object, type_name: str, path: str) -> None:
    cls = getattr(kubeflow_models, type_name, None) or getattr(k8s_models, type_name)
    if not isinstance(value, dict):
        raise ManifestError(f"{path}: expected a {type_name} mapping, got {value!r}")
    fields = {wire: attr for attr, wire in cls.attribute_map.items()}
    for key, item in value.items():
        if key not in fields:
            raise ManifestError(f"{path}: unknown field {key!r} (in {type_name})")
        kind = cls.openapi_types[fields[key]]
        if cls is k8s_models.V1ResourceRequirements and kind == "dict(str, str)":
            kind = "dict(str, object)"  # quantities are int-or-string; _quantities parses them
        check(item, kind, f"{path}.{key}")
    try:  # the generated constructor refuses a missing required field
        cls(**{fields[key]: item for key, item in value.items()})
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from None
