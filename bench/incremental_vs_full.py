"""Measure the incremental add against the full retrain, on a home that `sma train` has trained.

Given HOME with data/{general,A,B} and its versions v0001 (generalist) and v0002 (full retrain
of A and B), this builds a second home beside it that shares the generalist, trains A alone
(full), then adds B incrementally, and compares:

- B's held-out perplexity: incremental add vs the full retrain of both (goal: within 5%);
- A's held-out perplexity before and after adding B (goal: within 0.5%);
- wall time of the add vs the full retrain (goal: the add costs what B's corpus costs).

    python -m bench.incremental_vs_full --home sma-home --new deeplearning [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from shiftable_lib import checkpoint, jobs
from shiftable_lib.config import Settings
from shiftable_lib.corpus import GENERAL


def ppl(metrics: dict, name: str) -> float:
    return metrics["domains"][name]["model_ppl"]


def compare(home: Path, new: str) -> dict:
    """Train A alone and add `new` incrementally in a throwaway home beside `home`; compare
    with `home`'s full retrain (v0002). `home` itself is only read."""
    full = checkpoint.load_version(home / "artifacts" / "models", "v0002")
    others = [s for s in full.model.cfg.specialists if s != new]
    work = Path(tempfile.mkdtemp(prefix="incremental-"))
    try:
        for name in (GENERAL, *others):
            shutil.copytree(home / "data" / name, work / "data" / name)
        models = work / "artifacts" / "models"
        shutil.copytree(home / "artifacts" / "models" / "v0001", models / "v0001")
        settings = Settings(home=work)
        start = time.perf_counter()
        before = jobs.train_all(settings)[-1]
        without_seconds = time.perf_counter() - start
        shutil.copytree(home / "data" / new, work / "data" / new)
        start = time.perf_counter()
        added = jobs.add_specialist(settings, new)
        add_seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "new": new,
        "new_ppl_incremental": ppl(added.metrics, new),
        "new_ppl_full": ppl(full.metrics, new),
        "others_ppl_before": {n: ppl(before.metrics, n) for n in (GENERAL, *others)},
        "others_ppl_after": {n: ppl(added.metrics, n) for n in (GENERAL, *others)},
        "routing_after": {n: d.get("routing") for n, d in added.metrics["domains"].items()},
        "add_seconds": round(add_seconds, 1),
        "full_retrain_seconds": full.metrics["training"]["seconds"],
        "retrain_without_new_seconds": round(without_seconds, 1),
    }
    result["new_ppl_ratio"] = result["new_ppl_incremental"] / result["new_ppl_full"]
    result["others_ppl_change"] = {
        n: result["others_ppl_after"][n] / result["others_ppl_before"][n] - 1
        for n in result["others_ppl_before"]
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--new", required=True, help="the specialist to add incrementally")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    result = compare(args.home, args.new)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.new}: incremental ppl {result['new_ppl_incremental']:.2f} vs full "
        f"{result['new_ppl_full']:.2f} (x{result['new_ppl_ratio']:.3f})"
    )
    for n, change in result["others_ppl_change"].items():
        print(
            f"{n}: ppl {result['others_ppl_before'][n]:.2f} -> "
            f"{result['others_ppl_after'][n]:.2f} ({change:+.2%})"
        )
    print(
        f"time: add {result['add_seconds']}s vs full retrain of all specialists "
        f"{result['full_retrain_seconds']}s"
    )


if __name__ == "__main__":
    main()
