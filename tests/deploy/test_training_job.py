"""deploy/training-job: `sma train` as a Kubeflow PyTorchJob over several hosts.

Rendered with kustomize and validated offline (tests/deploy/manifests.py), then checked for what a
schema cannot say: the operator's conventions, torchrun's and our CLI's own parsers accepting the
command, ranks that split the profile's batches, one shared home. Last, the base job's command
runs as two "hosts" on loopback with the environment the operator gives its pods.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from bench.loopback import ManifestError, render
from bench.stack import free_port_block
from shiftable.cli import build_parser
from shiftable_lib import checkpoint
from shiftable_lib.config import get_profile
from tests.deploy.manifests import DEPLOY, validate
from tests.e2e.conftest import tiny_home

JOB = DEPLOY / "training-job"
VARIANTS = [JOB / "base", *sorted(p for p in (JOB / "overlays").iterdir() if p.is_dir())]


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> dict[str, dict]:
    return {obj["kind"]: obj for obj in render(request.param)}


def replicas(job: dict) -> dict[str, dict]:
    return job["spec"]["pytorchReplicaSpecs"]


def trainer(replica: dict) -> dict:
    return replica["template"]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def operator_env(job: dict, node_rank: int, port: int) -> dict[str, str]:
    """What the Training Operator adds to a pod's environment (for a job with a Master)."""
    nodes = sum(r["replicas"] for r in replicas(job).values())
    nproc = job["spec"]["nprocPerNode"]
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nodes * int(nproc)),
        "RANK": str(node_rank),
        "PET_NNODES": str(nodes),
        "PET_NODE_RANK": str(node_rank),
        "PET_NPROC_PER_NODE": nproc,
    }


def expand(argument: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], argument)


def test_every_object_is_valid_against_its_schema(rendered: dict[str, dict]) -> None:
    assert sorted(rendered) == ["PersistentVolumeClaim", "PyTorchJob"]
    for obj in rendered.values():
        validate(obj)


_DROP = object()


def _set(path: list, value: object):
    """A mutation that sets the field at `path` to `value`, or removes it (`_drop`)."""

    def mutate(obj: dict) -> None:
        for key in path[:-1]:
            obj = obj[key]
        if value is _DROP:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value

    return mutate


def _drop(path: list):
    return _set(path, _DROP)


MASTER = ["spec", "pytorchReplicaSpecs", "Master"]
POD = [*MASTER, "template", "spec"]


@pytest.mark.parametrize(
    ("kind", "mutate", "says"),
    [
        ("PyTorchJob", _set(["spec", "nprocsPerNode"], "4"), "unknown field 'nprocsPerNode'"),
        ("PyTorchJob", _set([*MASTER, "replicas"], "1"), "Master.replicas: expected int"),
        ("PyTorchJob", _drop([*POD, "containers"]), "`containers`, must not be `None`"),
        ("PyTorchJob", _set([*POD, "volumes", 0, "persistentVolumeClaim"], {"claim": "x"}),
         "unknown field 'claim'"),
        ("PyTorchJob", _set([*POD, "containers", 0, "resources", "limits", "memory"], "lots"),
         "'lots' is not a quantity"),
        ("PyTorchJob", _drop([*POD, "containers", 0, "env", 0, "name"]),
         "`name`, must not be `None`"),
        ("PyTorchJob", _set([*MASTER, "restartPolicy"], "Nevr"), "restartPolicy is not one of"),
        ("PyTorchJob", _set(["spec", "runPolicy", "cleanPodPolicy"], "Runing"),
         "cleanPodPolicy 'Runing' is not one of"),
        ("PyTorchJob", _set(["apiVersion"], "kubeflow.org/v2"), "no schema known"),
        ("PyTorchJob", _set(["metadata", "name"], "Sma_Train"), "RFC 1123"),
        ("PyTorchJob", _set(["spec", "pytorchReplicaSpecs", "Worker", "replicas"], 0),
         "replicas must be at least 1"),
        ("PersistentVolumeClaim", _set(["spec", "accessModes"], "ReadWriteMany"),
         "is not of type 'array'"),
    ],
)  # fmt: skip
def test_validation_refuses_what_a_cluster_would(
    rendered: dict[str, dict], kind: str, mutate, says: str
) -> None:
    obj = copy.deepcopy(rendered[kind])
    mutate(obj)
    with pytest.raises(ManifestError, match=re.escape(says)):
        validate(obj)


def test_each_host_runs_sma_train_under_torchrun(rendered: dict[str, dict]) -> None:
    job = rendered["PyTorchJob"]
    roles = replicas(job)
    assert sorted(roles) == ["Master", "Worker"] and roles["Master"]["replicas"] == 1
    # the operator gives its environment and rendezvous port to the container named pytorch
    assert all(trainer(r)["name"] == "pytorch" for r in roles.values())
    assert trainer(roles["Master"]) == trainer(roles["Worker"])  # one entry point everywhere
    container = trainer(roles["Master"])
    assert container["command"] == ["python", "-m", "torch.distributed.run"]
    env = operator_env(job, 0, 29500)
    launch = get_args_parser().parse_args([expand(a, env) for a in container["args"]])
    nodes = sum(r["replicas"] for r in roles.values())
    assert (int(launch.nnodes), launch.nproc_per_node) == (nodes, job["spec"]["nprocPerNode"])
    assert (launch.master_addr, launch.master_port) == ("127.0.0.1", 29500)
    assert launch.module and launch.training_script == "shiftable.cli"
    sma = build_parser().parse_args(launch.training_script_args)
    assert sma.command == "train"
    profile = get_profile(sma.profile)
    ranks = nodes * int(job["spec"]["nprocPerNode"])
    assert profile.batch_size % ranks == 0, "the language-model batch must split over the ranks"
    assert profile.gate_rows % ranks == 0, "the gate batch must split over the ranks"


def test_each_rank_gets_a_gpu_or_the_job_runs_on_cpus(rendered: dict[str, dict]) -> None:
    job = rendered["PyTorchJob"]
    for replica in replicas(job).values():
        container = trainer(replica)
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if gpus is None:
            assert env_of(container).get("SMA_DEVICE") == "cpu"
        else:
            assert gpus == job["spec"]["nprocPerNode"]


def test_every_pod_mounts_one_shared_home(rendered: dict[str, dict]) -> None:
    claim = rendered["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every host mounts it at once
    for replica in replicas(rendered["PyTorchJob"]).values():
        pod = replica["template"]["spec"]
        volume = {v["name"]: v for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            home = mounts[env_of(container)["SMA_HOME"]]
            assert volume[home]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


@pytest.mark.slow
def test_the_job_trains_across_two_hosts_on_loopback(tmp_path: Path) -> None:
    """The CPU job's own command as two "hosts": two torchrun processes, each with the
    operator's environment and two ranks, and one shared home."""
    job = next(o for o in render(JOB / "overlays" / "cpu-smoke") if o["kind"] == "PyTorchJob")
    home = tiny_home(tmp_path / "home")
    port = free_port_block(1)
    hosts, logs = [], [tmp_path / "master.log", tmp_path / "worker.log"]
    for rank, role in enumerate(("Master", "Worker")):
        container = trainer(replicas(job)[role])
        env = {**os.environ, **env_of(container), **operator_env(job, rank, port)}
        env.update(SMA_HOME=str(home), SMA_THREADS="1")  # the volume, mounted here
        argv = [expand(a, env) for a in container["command"] + container["args"]]
        argv = [sys.executable, *argv[1:]]  # the image's python is this one
        with logs[rank].open("wb") as log:  # files, not pipes: an unread pipe would block a host
            hosts.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 300
    try:  # until both end, one fails (then the other would wait for it in vain), or time is up
        while time.monotonic() < deadline and any(h.poll() is None for h in hosts):
            if any(h.poll() not in (None, 0) for h in hosts):
                break
            time.sleep(0.2)
    finally:
        for host in hosts:
            host.kill()
            host.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    assert [h.returncode for h in hosts] == [0, 0], "\n\n".join(outputs)
    assert sum(out.count("trained specialists") for out in outputs) == 1  # rank 0 reports
    models = home / "artifacts" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["CURRENT", "v0001", "v0002"]
    served = checkpoint.load_version(models, "v0002")
    assert served.model.cfg.specialists == ("dl", "ds")


def test_no_two_variants_share_a_job_or_a_home() -> None:
    """A variant applied after another must not patch the other's finished job, nor reuse a
    home trained with another profile."""
    seen: dict[tuple[str, str], str] = {}
    for variant in VARIANTS:
        for obj in render(variant):
            key = (obj["kind"], obj["metadata"]["name"])
            assert key not in seen, f"{variant.name} and {seen.get(key)} both define {key}"
            seen[key] = variant.name
