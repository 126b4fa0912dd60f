"""Generate the Python stubs of `protos/sma/v1/*.proto` next to them (`sma.v1.*_pb2`).

The stubs are checked in; `tests/protos` regenerates them into a temporary folder and fails if
they differ, so a `.proto` change without `make protos` cannot land.

    python scripts/gen_protos.py [OUT_DIR]    # default: protos/
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def proto_files() -> list[Path]:
    return sorted((PROTOS / "sma" / "v1").glob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto under `out`; return them."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    include = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
    sources = [str(p.relative_to(PROTOS)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(sources))
    for package in (out / "sma", out / "sma" / "v1"):
        init = package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (scripts/gen_protos.py)."""\n')
    return sorted(p for p in (out / "sma").rglob("*") if p.suffix in (".py", ".pyi"))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS
    for path in generate(target):
        print(path.relative_to(target))
