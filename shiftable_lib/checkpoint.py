"""Model versions on disk: `<models>/<version>/{model.safetensors,config.json,tokenizer.json,
metrics.json}`. A version directory appears only when complete (written to a temporary folder,
fsynced, then renamed). Loading reads safetensors and JSON only: nothing is ever unpickled.

config.json records the size and SHA-256 of the model and tokenizer files, and loading checks
them (and the tensors' names and shapes against the config) before anything serves: a
truncated or altered version is refused as VersionInvalid, saying what is wrong, rather than
served half-right.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from shiftable_lib.config import Profile
from shiftable_lib.durable import fsync_dir, write_file
from shiftable_lib.errors import NotFound, VersionInvalid
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.sampling import PLAIN_CHAT_TEMPLATE, chat_template_of
from shiftable_lib.tokenizer import load_tokenizer
from shiftable_lib.versions import (
    CURRENT,
    VERSION_PATTERN,
    check_sizes,
    current_version,
    set_current,
    version_ids,
)

__all__ = [
    "CURRENT",
    "current_version",
    "load_version",
    "next_version_id",
    "save_version",
    "set_current",
    "version_ids",
]

FORMAT = 1
CHECKED_FILES = ("model.safetensors", "tokenizer.json")  # recorded in config.json's "files"


@dataclass
class ModelVersion:
    """A loaded version: the model, its tokenizer and what was recorded with it."""

    id: str
    path: Path
    model: ShiftableLM
    tokenizer: Tokenizer
    profile: Profile
    meta: dict
    metrics: dict

    @property
    def chat_template(self) -> str:
        return chat_template_of(self.meta.get("chat_template"))

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens that end a generation: an imported model's own (config.json's
        "eos_tokens"), else () for our EOS."""
        return tuple(self.meta.get("eos_tokens") or ())


INHERITED = ("chat_template", "eos_tokens", "base")  # a version's traits its children keep


def inherited(meta: dict) -> dict:
    """What a version grown from one recorded with `meta` records the same: its chat template,
    its stop tokens, the checkpoint its base was imported from."""
    return {key: meta[key] for key in INHERITED if key in meta}


def next_version_id(models_dir: Path) -> str:
    ids = version_ids(models_dir)
    return f"v{(int(ids[-1][1:]) + 1 if ids else 1):04d}"


def save_version(
    models_dir: Path,
    model: ShiftableLM,
    tokenizer: Tokenizer,
    profile: Profile,
    metrics: dict,
    meta: dict | None = None,
) -> str:
    """Write a new complete version directory and return its id (it does not become current).

    A version grown from an imported base (`meta["base"]`) stores only the tensors that differ
    from the base's (the specialists' branches, the gate rows) and names the base version and
    its file's digest ("delta_of"); the import itself stores everything and becomes the base.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    version = next_version_id(models_dir)
    meta = dict(meta or {})
    tmp = models_dir / f".tmp-{version}-{os.getpid()}"
    tmp.mkdir()
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        if "base" in meta and "version" not in meta["base"]:  # the import: it is the base
            meta["base"] = {**meta["base"], "version": version}
        elif "base" in meta:
            state, meta["delta_of"] = _delta(models_dir, meta["base"]["version"], state)
        save_file(state, str(tmp / "model.safetensors"))
        with open(tmp / "model.safetensors", "rb+") as f:
            os.fsync(f.fileno())
        write_file(tmp / "tokenizer.json", tokenizer.to_str().encode())
        config = {
            "format": FORMAT,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model.cfg.to_dict(),
            "profile": profile.to_dict(),
            "files": {name: _fingerprint(tmp / name) for name in CHECKED_FILES},
            "chat_template": PLAIN_CHAT_TEMPLATE,
            **meta,
        }
        write_file(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
        write_file(tmp / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True).encode())
        fsync_dir(tmp)
        os.rename(tmp, models_dir / version)  # fails rather than replace an existing version
        fsync_dir(models_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version


# A decode step reads every weight once. Past the CPU's caches that is bound by memory
# bandwidth, which bfloat16 halves where the CPU has bfloat16 instructions; a smaller model
# pays more for the conversions than it saves (docs/benchmarks.md, "bfloat16 on a CPU").
CPU_BF16_MIN_BYTES = 16 * 2**20  # of float32 weights


def weight_bytes(model: torch.nn.Module) -> int:
    """The model's weights in float32 bytes: what `serving_dtype` sizes a model by."""
    return sum(p.numel() for p in model.parameters()) * 4


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def serving_dtype(name: str, device: torch.device, size: int = 0) -> torch.dtype:
    """The dtype a model of `size` bytes of float32 weights (`weight_bytes`) serves in. For `auto`:
    bfloat16 on a GPU (half the memory traffic of a decode step, which is bound by it); on a
    CPU, bfloat16 for a model past CPU_BF16_MIN_BYTES where the CPU has bfloat16 instructions,
    else float32 (emulated bfloat16 matmuls are slow)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        large = size >= CPU_BF16_MIN_BYTES
        return torch.bfloat16 if large and cpu_has_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_version(
    models_dir: Path,
    version: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> ModelVersion:
    """Load a complete version, once its files pass their check (VersionInvalid otherwise),
    onto `device` in `dtype`: a dtype, or a `serving_dtype` name (`auto`, by the model's
    size and the device)."""
    path = models_dir / version
    if not VERSION_PATTERN.match(version) or not path.is_dir():
        raise NotFound(f"no model version {version!r} in {models_dir}")
    meta = _read_json(path / "config.json", version)
    recorded_files = meta.get("files", {})  # versions written before recorded none
    if unknown := sorted(set(recorded_files) - set(CHECKED_FILES)):
        raise VersionInvalid(f"{version}: config.json lists an unknown file {unknown[0]!r}")
    check_sizes(models_dir, version, meta)
    for name, recorded in recorded_files.items():
        if _fingerprint(path / name) != recorded:
            raise VersionInvalid(
                f"{version}: {name} is not the file it was written as (its SHA-256 differs)"
            )
    try:
        cfg = ModelConfig.from_dict(meta["model"])
        model = ShiftableLM(cfg)
        state = load_file(str(path / "model.safetensors"), device="cpu")
        if "delta_of" in meta:
            state = {**_base_state(models_dir, version, meta["delta_of"]), **state}
        model.load_state_dict(state, strict=True)
        profile = Profile.from_dict(meta["profile"])
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
        raise VersionInvalid(f"{version}: its files do not make a model ({exc})") from exc
    metrics_path = path / "metrics.json"
    if isinstance(dtype, str):
        dtype = serving_dtype(dtype, torch.device(device), weight_bytes(model))
    return ModelVersion(
        id=version,
        path=path,
        model=model.to(device, dtype).eval(),
        tokenizer=load_tokenizer(path / "tokenizer.json"),
        profile=profile,
        meta=meta,
        metrics=_read_json(metrics_path, version) if metrics_path.is_file() else {},
    )


def _delta(
    models_dir: Path, base: str, state: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of `state` that the base version's file lacks or holds otherwise, and what
    names that file: its version, size and SHA-256."""
    path = models_dir / base / "model.safetensors"
    if not path.is_file():
        raise VersionInvalid(f"the base version {base} is missing: nothing can grow from it")
    held = load_file(str(path), device="cpu")
    changed = {
        k: v for k, v in state.items() if k not in held or not torch.equal(held[k].to(v.dtype), v)
    }
    return changed, {"version": base, **_fingerprint(path)}


def _base_state(models_dir: Path, version: str, base: dict) -> dict[str, torch.Tensor]:
    """The weights of the base version a delta names, once its file is the one it names."""
    path = models_dir / str(base.get("version", "")) / "model.safetensors"
    if _fingerprint(path) != {k: base.get(k) for k in ("bytes", "sha256")}:
        raise VersionInvalid(
            f"{version}: it holds only what differs from {base.get('version')}, whose "
            "model.safetensors is missing or not the file it grew from"
        )
    return load_file(str(path), device="cpu")


def _fingerprint(path: Path) -> dict:
    """A file's size and SHA-256, as config.json records them; an absent file has neither."""
    if not path.is_file():
        return {}
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _read_json(path: Path, version: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VersionInvalid(f"{version}: cannot read {path.name} ({exc})") from exc
