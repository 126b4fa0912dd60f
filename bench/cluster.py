"""Benchmark the stack as the Kubernetes manifests run it, on loopback (bench/loopback.py).

Two clusters from the rendered overlay, one after the other on the same home: one with one
inference replica, one with two (one gateway each; every other workload as the manifests say).
On each, `--clients` SSE clients stream `--tokens` tokens per request through the gateway for
`--seconds`: streams and tokens per second, latency, and the CPU each pod used (what limits the
rate on a small machine). On the two-replica cluster, also:

- **publish to served**: `--adds` specialists added through the gateway while a registry
  WatchServing stream times the moment the version is published and the moment each replica
  reports serving it;
- **a replica killed under load**: the same clients stream while one replica's process group is
  SIGKILLed; for each client whose stream was cut, the time from the kill to the first token of
  its next successful stream; then the replica restarts, and the time until it serves again.

A home with a model (`--home`, its data/ and artifacts/ are copied) is served as it is;
without one, the first cluster's first start builds the demo corpus and trains (`--profile`).

    python -m bench.cluster [--home sma-home] [--profile tiny] [--overlay cpu] [--clients 8] \\
        [--tokens 32] [--seconds 20] [--adds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx

from bench.loopback import STACK, LoopbackCluster, Pod, render
from bench.stack import fresh_name
from shiftable_lib.corpus import DOCUMENT_SEPARATOR, read_documents
from sma.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc

FIRST_START_S = 3600.0  # a first start trains: as long as its profile takes
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Stream:
    """One request of a client: when it started, its first token, its end, and how it ended."""

    start: float
    first: float | None
    end: float
    tokens: int
    ok: bool


def stream_once(http: httpx.Client, url: str, tokens: int) -> Stream:
    body = {"prompt": "the", "max_new_tokens": tokens, "ignore_eos": True}
    start, first, count, ok = time.monotonic(), None, 0, False
    try:
        with http.stream("POST", f"{url}/generate/stream", json=body) as response:
            name = ""
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name == "token":
                    first = first or time.monotonic()
                    count += len(json.loads(line[6:])["token_ids"])
                elif line.startswith("data: ") and name == "done":
                    ok = True
    except httpx.HTTPError:
        pass
    return Stream(start, first, time.monotonic(), count, ok)


def drive(url: str, clients: int, tokens: int, seconds: float, during=None) -> list[list[Stream]]:
    """`clients` threads streaming back to back for `seconds`; `during()` runs meanwhile on this
    thread. Returns each client's streams."""
    stop = time.monotonic() + seconds
    streams: list[list[Stream]] = [[] for _ in range(clients)]

    def client(mine: list[Stream]) -> None:
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop:
                mine.append(stream_once(http, url, tokens))

    threads = [threading.Thread(target=client, args=(s,)) for s in streams]
    for thread in threads:
        thread.start()
    if during is not None:
        during()
    for thread in threads:
        thread.join()
    return streams


def cpu_seconds(pod: Pod) -> float:
    """CPU time of every process in the pod's process group (the server and its children)."""
    if pod.process is None:
        return 0.0
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pod.process.pid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / TICKS


def load(cluster: LoopbackCluster, args: argparse.Namespace) -> dict:
    url = cluster.url(cluster.of("gateway")[0])
    drive(url, args.clients, args.tokens, 3.0)  # warm-up: connections, first batches
    before = {p.name: cpu_seconds(p) for p in cluster.pods}
    own = time.process_time()
    start = time.monotonic()
    streams = [s for mine in drive(url, args.clients, args.tokens, args.seconds) for s in mine]
    elapsed = time.monotonic() - start
    done = [s for s in streams if s.ok]
    return {
        "replicas": len(cluster.of("inference")),
        "streams_per_s": len(done) / elapsed,
        "tokens_per_s": sum(s.tokens for s in done) / elapsed,
        "failed": len(streams) - len(done),
        "latency_p50_s": statistics.median(s.end - s.start for s in done),
        "first_token_p50_s": statistics.median(s.first - s.start for s in done if s.first),
        "cpu": {
            **{p.name: (cpu_seconds(p) - before[p.name]) / elapsed for p in cluster.pods},
            "clients": (time.process_time() - own) / elapsed,
        },
    }


def publish_to_served(cluster: LoopbackCluster, data: Path, adds: int) -> list[dict]:
    """Per add: seconds from the version's publication to each replica reporting it served."""
    events: list[tuple[float, registry_pb2.ServingState]] = []
    channel = grpc.insecure_channel(cluster.address(cluster.of("registry")[0]))
    watch = registry_pb2_grpc.RegistryStub(channel).WatchServing(registry_pb2.WatchServingRequest())

    def record() -> None:
        try:
            for reply in watch:
                events.append((time.monotonic(), reply.serving))
        except grpc.RpcError:
            pass  # cancelled at the end

    watcher = threading.Thread(target=record)
    watcher.start()
    url = cluster.url(cluster.of("gateway")[0])
    results = []
    with httpx.Client(base_url=url, timeout=None) as http:
        served = http.get("/specialists").raise_for_status().json()
        source = next(s for s in served if (data / s).is_dir())
        docs = read_documents(data / source)[:50]
        for _ in range(adds):
            name = fresh_name("benchrep", data, served)
            (data / name).mkdir(parents=True)
            (data / name / "corpus.txt").write_text(DOCUMENT_SEPARATOR.join(docs) + "\n")
            reply = http.post("/specialists", json={"name": name})
            if reply.status_code != 200:
                raise RuntimeError(f"POST /specialists {name}: {reply.status_code} {reply.text}")
            served.append(name)
            version = http.get("/health").json()["serving_version"]
            published = next(t for t, s in events if s.version.id == version)
            each = {}
            for t, s in events:
                for replica in s.replicas:
                    if replica.version_id == version and replica.id not in each:
                        each[replica.id] = t - published
            results.append({"version": version, "replicas": each, "all": max(each.values())})
    watch.cancel()
    watcher.join()
    channel.close()
    return results


def kill_under_load(cluster: LoopbackCluster, args: argparse.Namespace) -> dict:
    url = cluster.url(cluster.of("gateway")[0])
    victim = cluster.of("inference")[-1]
    killed = 0.0

    carrying = 0

    def kill() -> None:
        """A third of the way in, at a moment the victim is carrying streams: SIGKILL its
        process group (the server and its decode worker, as a container's end would)."""
        nonlocal killed, carrying
        time.sleep(args.seconds / 3)
        assert victim.process is not None
        with grpc.insecure_channel(cluster.address(victim)) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while not carrying:
                carrying = stub.GetModelInfo(inference_pb2.GetModelInfoRequest()).active_streams
        killed = time.monotonic()
        os.killpg(victim.process.pid, signal.SIGKILL)
        victim.process.wait()

    streams = drive(url, args.clients, args.tokens, args.seconds, during=kill)
    recovered = []
    for mine in streams:
        cut = [s for s in mine if not s.ok and s.start <= killed]
        if cut:
            later = [s.first for s in mine if s.ok and s.start >= cut[0].end and s.first]
            recovered.append(min(later) - killed if later else float("inf"))
    restart = time.monotonic()
    cluster.restart(victim)
    cluster.wait_ready([victim], timeout=300)
    ready = time.monotonic() - restart
    with grpc.insecure_channel(cluster.address(victim)) as channel, httpx.Client() as http:
        stub = inference_pb2_grpc.InferenceStub(channel)
        while stub.GetModelInfo(inference_pb2.GetModelInfoRequest()).requests_total == 0:
            stream_once(http, url, 2)
    return {
        "streams_on_victim": carrying,
        "clients_cut": len(recovered),
        "streams_failed": sum(not s.ok for mine in streams for s in mine),
        "longest_stream_s": max(s.end - s.start for mine in streams for s in mine),
        "served_again_median_s": statistics.median(recovered) if recovered else None,
        "served_again_max_s": max(recovered) if recovered else None,
        "restart_to_ready_s": ready,
        "restart_to_served_s": time.monotonic() - restart,
    }


def run(args: argparse.Namespace) -> dict:
    objects = render(STACK / "overlays" / args.overlay)
    work = Path(tempfile.mkdtemp(prefix="sma-cluster-bench-"))
    home = work / "home"
    if args.home:
        for part in ("data", "artifacts"):
            shutil.copytree(args.home / part, home / part, symlinks=False)
    report: dict = {"overlay": args.overlay, "profile": args.profile, "cpus": os.cpu_count()}
    for replicas in (1, 2):
        cluster = LoopbackCluster(
            objects,
            work / f"replicas-{replicas}",
            env={"SMA_PROFILE": args.profile},
            replicas={"inference": replicas, "gateway": 1},
        )
        if home.exists():
            shutil.copytree(home, cluster.volumes / "sma-home")
        with cluster:
            start = time.monotonic()
            cluster.wait_ready(timeout=FIRST_START_S)
            report.setdefault("first_ready_s", time.monotonic() - start)
            if not home.exists():  # the first start trained it: the second cluster reuses it
                for part in ("data", "artifacts"):
                    shutil.copytree(cluster.volumes / "sma-home" / part, home / part)
            report[f"load_{replicas}"] = load(cluster, args)
            if replicas == 2:
                data = cluster.volumes / "sma-home" / "data"
                report["publish"] = publish_to_served(cluster, data, args.adds)
                report["kill"] = kill_under_load(cluster, args)
    shutil.rmtree(work, ignore_errors=True)
    return report


def print_report(report: dict) -> None:
    one, two = report["load_1"], report["load_2"]
    print(f"loopback cluster, overlay {report['overlay']}, profile {report['profile']}, "
          f"{report['cpus']} CPUs")  # fmt: skip
    print(f"{'':34} {'1 replica':>12} {'2 replicas':>12} {'ratio':>7}")
    for key, label in [
        ("streams_per_s", "streams/s through one gateway"),
        ("tokens_per_s", "tokens/s"),
        ("latency_p50_s", "stream latency p50 (s)"),
        ("first_token_p50_s", "first token p50 (s)"),
    ]:
        print(f"{label:34} {one[key]:12.2f} {two[key]:12.2f} {two[key] / one[key]:7.2f}")
    for name, load in (("1 replica", one), ("2 replicas", two)):
        cpu = ", ".join(f"{pod} {share:.2f}" for pod, share in load["cpu"].items())
        print(f"CPU cores used, {name}: {cpu}")
    alls = [p["all"] for p in report["publish"]]
    print(f"publish -> every replica serving: median {statistics.median(alls):.2f} s, "
          f"max {max(alls):.2f} s over {len(alls)} adds")  # fmt: skip
    kill = report["kill"]
    print(f"replica killed under load: {kill['clients_cut']} clients cut, served again in "
          f"median {kill['served_again_median_s']} s, max {kill['served_again_max_s']} s; "
          f"restarted replica ready in {kill['restart_to_ready_s']:.1f} s, serving in "
          f"{kill['restart_to_served_s']:.1f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a home with a model (data/, artifacts/)")
    parser.add_argument("--profile", default="tiny", help="for a first start (default tiny)")
    parser.add_argument("--overlay", default="cpu", help="deploy/stack/overlays/<name>")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--adds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)


if __name__ == "__main__":
    main()
