"""A training job spread over data-parallel processes (`SMA_NPROC_PER_NODE` > 1).

The job's child process (child.main) does not train itself. It starts
`python -m torch.distributed.run --standalone --nproc-per-node N -m services.training.ranks TASK`,
PyTorch's own launcher. Every rank runs the same job through `shiftable_lib.jobs`, which splits
each global batch over the ranks and lets rank 0 alone write (shiftable_lib/distributed.py).

Rank 0 reports progress and the outcome as lines of JSON after a marker on its stdout. The child
relays them to the server as if it had trained itself, and sends every other line to the log.
A rank that dies makes torchrun stop the others and exit non-zero. The child then fails the job
with torchrun's root cause: the rank, its exit code or signal.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

from services.training.child import Sender, die_with_parent, run_job
from services.training.job import (
    Failed,
    JobKind,
    JobProgress,
    Outcome,
    Published,
    Task,
    Written,
)

log = logging.getLogger("sma.training.ranks")
MARK = "@sma-job "
KINDS = {cls.__name__: cls for cls in (JobProgress, Written, Published, Failed)}


def encode_task(task: Task) -> str:
    data = asdict(task)
    data["kind"], data["home"] = task.kind.name, str(task.home)
    return json.dumps(data)


def decode_task(text: str) -> Task:
    data = json.loads(text)
    data["kind"], data["home"] = JobKind[data["kind"]], Path(data["home"])
    return Task(**data)


class _Lines:
    """What rank 0 gives the job as its connection: each message becomes one marked line."""

    def send(self, message: object) -> None:
        record = {"type": type(message).__name__, **asdict(message)}
        print(MARK + json.dumps(record), flush=True)


class _Nowhere:
    def send(self, message: object) -> None:
        pass


def _message(line: str) -> object:
    record = json.loads(line[len(MARK) :])
    cls = KINDS[record.pop("type")]
    return cls(**{f.name: record[f.name] for f in fields(cls)})


def relay(conn: Sender, task: Task) -> Outcome:
    """In the job's child: run the ranks under torchrun, pass rank 0's reports on to `conn`,
    and return the job's outcome."""
    from shiftable_lib import distributed  # PyTorch: the server itself never imports it

    with tempfile.NamedTemporaryFile("w", prefix="sma-task-", suffix=".json") as spec:
        spec.write(encode_task(task))
        spec.flush()
        launcher = subprocess.Popen(
            distributed.torchrun_command(task.nproc, "services.training.ranks", [spec.name]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # torchrun stops its ranks on SIGTERM: when this child dies, and when it is cancelled
            preexec_fn=lambda: die_with_parent(os.getppid(), signal.SIGTERM),
        )
        signal.signal(signal.SIGTERM, lambda *_: launcher.terminate())
        outcome: Outcome | None = None
        tail: collections.deque[str] = collections.deque(maxlen=200)
        assert launcher.stdout is not None
        for line in launcher.stdout:
            if line.startswith(MARK):
                message = _message(line)
                if isinstance(message, JobProgress | Written):
                    conn.send(message)
                else:
                    outcome = message  # type: ignore[assignment]
            else:
                tail.append(line.rstrip())
                log.info("%s", line.rstrip())
        code = launcher.wait()
    if isinstance(outcome, Published):
        return outcome
    cause = f"training processes failed (torchrun exit {code}): {root_cause(tail)}"
    if outcome is None:
        return Failed(cause)
    if code != 0 and re.search(r"exit code -\d|Signal \d", cause):
        # a rank was killed; rank 0 then failed on the broken connection: the kill comes first
        return Failed(f"{cause}; then rank 0: {outcome.error.splitlines()[0][:300]}")
    return outcome  # the job's own failure (a bad corpus...), the same on every rank


def root_cause(lines: collections.abc.Iterable[str]) -> str:
    """The rank and reason of torchrun's 'Root Cause' summary, else the last line printed."""
    text = "\n".join(lines)
    cause = text.rsplit("Root Cause", 1)[-1]
    found = {
        key: m.group(1).strip()
        for key in ("rank", "exitcode", "traceback")
        if (m := re.search(rf"^\s*{key}\s*:\s*(.+)$", cause, re.MULTILINE))
    }
    if "rank" in found:
        parts = [f"rank {found['rank']}", f"exit code {found.get('exitcode', '?')}"]
        if found.get("traceback", "<N/A>") != "<N/A>":
            parts.append(found["traceback"])
        return ", ".join(parts)
    last = [line for line in lines if line.strip()]
    return last[-1] if last else "no output"


def main(argv: list[str]) -> int:
    """One rank (torchrun runs this once per process): the job, reported by rank 0."""
    from shiftable_lib import distributed

    die_with_parent(os.getppid())  # torchrun's agent gone: nothing left to coordinate with
    task = decode_task(Path(argv[0]).read_text())
    main_rank = int(os.environ.get("RANK", "0")) == 0
    conn = _Lines() if main_rank else _Nowhere()
    outcome = run_job(conn, task)
    if main_rank:
        conn.send(outcome)
    distributed.shutdown(completed=isinstance(outcome, Published))
    return 0 if isinstance(outcome, Published) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
