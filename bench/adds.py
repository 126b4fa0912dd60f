"""What adding and deleting specialists does to the rest of the model, and what it costs.

In a fresh home: the first training (the demo corpus: general, datascience, deeplearning),
timed; then, in order, delete deeplearning and add it back (a demo domain), add two corpora a
user might bring that overlap the general text (the pydoc pages of the `asyncio` package's
modules, and the licence texts of the installed Python packages), and delete them again. Every
step prints each domain's held-out perplexity before and after it (the job's own comparison, on
the same text), the gate offset the add was calibrated to, and its time against the first
training's.

    python -m bench.adds --profile cpu [--device cuda] [--max-drift 0.5] [--json out.json]

Steps whose model would make another domain worse than --max-drift are refused, as the
service refuses them; the table says so.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import pkgutil
import pydoc
import tempfile
import time
from pathlib import Path

from shiftable_lib import jobs
from shiftable_lib.config import Settings
from shiftable_lib.errors import DriftTooLarge


def asyncio_pages(folder: Path) -> int:
    """The pydoc text of each public module of `asyncio`, a file each."""
    import asyncio

    folder.mkdir(parents=True, exist_ok=True)
    # the modules only: the package's own page repeats every class they export
    names = [
        f"asyncio.{m.name}" for m in pkgutil.iter_modules(asyncio.__path__) if m.name[0] != "_"
    ]
    size = 0
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        text = pydoc.render_doc(module, renderer=pydoc.plaintext)
        size += (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return size


def licence_texts(folder: Path) -> int:
    """The licence files of the installed distributions, each text once."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    size = 0
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            if not file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if not text.strip() or digest in seen:
                continue
            seen.add(digest)
            size += (folder / f"{digest[:12]}.txt").write_text(text, encoding="utf-8")
    return size


def step(kind: str, name: str, run, first_s: float) -> dict:
    started = time.perf_counter()
    try:
        result = run()
    except DriftTooLarge as refused:
        return {"step": f"{kind} {name}", "refused": str(refused)}
    seconds = time.perf_counter() - started
    metrics = result.metrics
    training = metrics["training"]
    calibration = training.get("calibration", {})
    phases = {
        k: v["seconds"] for k, v in training.items() if isinstance(v, dict) and "seconds" in v
    }
    return {
        "step": f"{kind} {name}",
        "version": result.version,
        "seconds": round(seconds, 1),
        "of_first": round(seconds / first_s, 3),
        "gate_offset": calibration.get("gate_offset"),
        "phases_s": phases,  # the rest: loading, reading corpora, evaluating, writing
        "changes": metrics.get("changes", {}),
    }


def run(profile: str, device: str, max_drift: float, home: Path) -> dict:
    settings = Settings(home=home, profile=profile, device=device, max_drift=max_drift)
    data = home / "data"
    started = time.perf_counter()
    first = jobs.train_all(settings, profile, demo_if_empty=True)[-1].metrics
    first_s = time.perf_counter() - started
    corpora = home / "corpora"
    sizes = {
        "asyncio": asyncio_pages(corpora / "asyncio"),
        "licenses": licence_texts(corpora / "licenses"),
    }
    steps = [
        step(
            "delete",
            "deeplearning",
            lambda: jobs.remove_specialist(settings, "deeplearning"),
            first_s,
        )
    ]
    # the deleted corpus waits in data/.deleted/: the same text comes back
    for archived in (data / ".deleted").glob("deeplearning-*"):
        archived.rename(data / "deeplearning")
        add = step(
            "add", "deeplearning", lambda: jobs.add_specialist(settings, "deeplearning"), first_s
        )
        steps.append(add)
    for name in ("asyncio", "licenses"):
        (corpora / name).rename(data / name)
        steps.append(step("add", name, lambda n=name: jobs.add_specialist(settings, n), first_s))
    for name in ("licenses", "asyncio"):
        if (data / name).is_dir() and any(
            s.get("version") and s["step"] == f"add {name}" for s in steps
        ):
            steps.append(
                step("delete", name, lambda n=name: jobs.remove_specialist(settings, n), first_s)
            )
    return {
        "profile": profile,
        "device": device,
        "max_drift": max_drift,
        "first_training_s": round(first_s, 1),
        "first_training": {  # held-out ratio to the generalist and routing share, per domain
            n: {"ratio": round(d["ratio"], 3), "routing": round(d["routing"], 3)}
            for n, d in first["domains"].items()
        },
        "corpus_bytes": sizes,
        "steps": steps,
    }


def table(result: dict) -> str:
    lines = [
        f"profile {result['profile']} on {result['device']}: first training "
        f"{result['first_training_s']} s; limit {result['max_drift']}%",
        "first training, held-out perplexity against the generalist's (routing share): "
        + "; ".join(
            f"{n} {d['ratio']:.3f} ({d['routing']:.3f})"
            for n, d in result["first_training"].items()
        ),
        "",
        "| step | version | time (s) | of first training | gate offset "
        "| held-out perplexity, before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["steps"]:
        if "refused" in s:
            lines.append(f"| {s['step']} | refused | | | | {s['refused']} |")
            continue
        moved = "; ".join(
            f"{n} {c['before']:.2f} -> {c['after']:.2f} ({100 * c['change']:+.2f}%)"
            for n, c in s["changes"].items()
        )
        offset = "" if s["gate_offset"] is None else f"{s['gate_offset']:.2f}"
        lines.append(
            f"| {s['step']} | {s['version']} | {s['seconds']} | {s['of_first']:.2f} | {offset} "
            f"| {moved} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-drift", type=float, default=0.5, metavar="PERCENT")
    parser.add_argument(
        "--home", type=Path, default=None, help="a new folder (default: a temporary one)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="adds-"))
    result = run(args.profile, args.device, args.max_drift, home)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
