"""How much work on another core slows one decode stream: batch-1 tokens/s pinned to one CPU,
with a second CPU idle, running a busy loop, or streaming memory.

On a VM whose cores share a physical core or its caches, the stack's servers and client slow
the decode worker just by running beside it; this measures that effect without any of them.
Linux only (CPU affinity); needs two CPUs.

    .venv/bin/python scripts/probe_interference.py --home sma-home [--rounds 6] [--tokens 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from ab_decode import steps_per_second  # scripts/, beside this one

from shiftable_lib import jobs
from shiftable_lib.config import Settings
from shiftable_lib.generate import Engine

# what runs on the other CPU; "{cpu}" is its number
LOADS = {
    "idle": None,
    "busy loop": "import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass",
    "memory stream": (
        "import os, numpy as np\nos.sched_setaffinity(0, {{{cpu}}})\n"
        "a = np.ones(50_000_000)\nwhile True: a.sum()"  # 400 MB, far past any cache
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        sys.exit("needs two CPUs")
    mine, other = cpus[0], cpus[1]
    os.sched_setaffinity(0, {mine})
    torch.set_num_threads(1)
    version = jobs.load_current(Settings(home=args.home.resolve()), "cpu")
    engine = Engine(version.model, version.tokenizer, 1)
    steps_per_second(engine, 1, args.tokens)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in LOADS}
    for _ in range(args.rounds):
        for name, code in LOADS.items():
            load = None
            if code is not None:
                load = subprocess.Popen([sys.executable, "-c", code.format(cpu=other)])
                time.sleep(1.0)  # let it allocate and settle
            try:
                rates[name].append(steps_per_second(engine, 1, args.tokens))
            finally:
                if load is not None:
                    load.kill()
                    load.wait()
    idle = rates["idle"]
    print(f"decode on CPU {mine}, batch 1, {args.tokens} tokens, {args.rounds} rounds (medians)")
    for name, values in rates.items():
        ratio = statistics.median(v / i for v, i in zip(values, idle, strict=True))
        print(f"CPU {other} {name:14} {statistics.median(values):8.0f} tok/s  {ratio:.2f}x idle")


if __name__ == "__main__":
    main()
