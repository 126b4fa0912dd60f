"""The wire contracts: buf lint passes, and the checked-in stubs match the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_protos  # noqa: E402

BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_buf_lint_passes_with_default_rules() -> None:
    if not BUF.exists():
        pytest.fail("buf is missing: `make install` puts it in node_modules/ (npm ci)")
    done = subprocess.run(
        [str(BUF), "lint", "protos"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    config = (ROOT / "protos" / "buf.yaml").read_text()
    assert "except" not in config and "use:" not in config  # the default rule set, untouched


def _breaking(module: Path) -> subprocess.CompletedProcess:
    against = ROOT / "protos" / "released.binpb"
    return subprocess.run(
        [str(BUF), "breaking", str(module), "--against", str(against)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contract_breaks_nothing_of_the_last_release(tmp_path: Path) -> None:
    """`buf breaking` against the released contract passes; and it bites: the same protos
    with a field of GenerateRequest removed fail it."""
    if not BUF.exists():
        pytest.fail("buf is missing: `make install` puts it in node_modules/ (npm ci)")
    done = _breaking(ROOT / "protos")
    assert done.returncode == 0, done.stdout + done.stderr
    copy = tmp_path / "protos"
    shutil.copytree(
        ROOT / "protos", copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "*.binpb")
    )
    proto = copy / "sma" / "v1" / "inference.proto"
    text = proto.read_text()
    assert "  bool ignore_eos = 9;\n" in text
    proto.write_text(text.replace("  bool ignore_eos = 9;\n", ""))
    broken = _breaking(copy)
    assert broken.returncode != 0 and "ignore_eos" in broken.stdout + broken.stderr


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    generated = gen_protos.generate(tmp_path)
    assert generated, "no stubs generated"
    stale = [
        str(p.relative_to(tmp_path))
        for p in generated
        if p.read_bytes() != (ROOT / "protos" / p.relative_to(tmp_path)).read_bytes()
    ]
    assert not stale, f"stubs out of date, run `make protos`: {stale}"
    checked_in = {
        p.relative_to(ROOT / "protos")
        for p in (ROOT / "protos" / "sma").rglob("*_pb2*.py*")
        if "__pycache__" not in p.parts  # bytecode of whoever imported them, not stubs
    }
    assert checked_in == {p.relative_to(tmp_path) for p in generated if "_pb2" in p.name}


def test_services_have_their_fixed_names() -> None:
    from sma.v1 import inference_pb2, registry_pb2, training_pb2

    names = {
        registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
        training_pb2.DESCRIPTOR.services_by_name["Training"].full_name,
        inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    }
    assert names == {"sma.v1.Registry", "sma.v1.Training", "sma.v1.Inference"}
    generate = inference_pb2.DESCRIPTOR.services_by_name["Inference"].methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
