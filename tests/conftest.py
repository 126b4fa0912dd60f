"""Shared fixtures: tiny corpora, a tiny tokenizer and tiny models (seconds on a CPU)."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from bench.loadrun import WORDS
from shiftable_lib.model import ModelConfig, ShiftableLM
from shiftable_lib.tokenizer import train_tokenizer

VOCAB = WORDS  # the words of each synthetic domain, shared with the load run
# The publish limit for adds and removals (SMA_MAX_DRIFT) in every test, and every stack a test
# starts, unless it says otherwise: the tiny profile's held-out splits are a few hundred tokens
# of random words, where one window's luck moves a domain's perplexity by about a percent.
# tests/lib/test_drift.py holds adds to the default limit.
TINY_DRIFT = 5.0
os.environ.setdefault("SMA_MAX_DRIFT", str(TINY_DRIFT))


def synthetic_documents(domain: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{domain}-{seed}")
    words = VOCAB[domain]
    return [
        " ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)
    ]


def write_domain(data_dir: Path, name: str, docs: list[str], file: str = "corpus.txt") -> Path:
    folder = data_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file).write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    return folder


# documents per domain -> a home trained once in this test session, which callers copy
_TRAINED: dict[int, Path] = {}


def train_tiny_home(home: Path, documents: int = 30) -> Path:
    """A home as `sma train --profile tiny` leaves it: v0001 (the generalist), then v0002 (every
    domain of VOCAB but general as a specialist). Returns its models folder.

    The same corpus trains to the same home, so each size is trained once per session and
    copied into each caller's own `home` (a home that already holds data is trained in place)."""
    if (home / "data").exists():
        return _train_tiny(home, documents)
    if documents not in _TRAINED:
        template = Path(tempfile.mkdtemp(prefix="sma-tiny-home-"))
        atexit.register(shutil.rmtree, template, True)
        _train_tiny(template, documents)
        _TRAINED[documents] = template
    shutil.copytree(_TRAINED[documents], home, dirs_exist_ok=True)
    return home / "artifacts" / "models"


def _train_tiny(home: Path, documents: int) -> Path:
    from shiftable_lib import jobs
    from shiftable_lib.config import Settings

    for name in VOCAB:
        write_domain(home / "data", name, synthetic_documents(name, documents))
    jobs.train_all(Settings(home=home, profile="tiny", device="cpu"))
    return home / "artifacts" / "models"


def torchrun_ranks(ancestor: int) -> dict[int, int]:
    """RANK -> pid of the training ranks that torchrun started below process `ancestor`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(
                e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e
            )
        except OSError:
            continue
        if b"TORCHELASTIC_RUN_ID" in env and b"RANK" in env and _descends(int(proc.name), ancestor):
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int((Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with a general corpus and two specialist corpora (ds, dl)."""
    for name in VOCAB:
        write_domain(tmp_path / "data", name, synthetic_documents(name, 40))
    return tmp_path


@pytest.fixture(scope="session")
def tokenizer():
    texts = [d for name in VOCAB for d in synthetic_documents(name, 20)]
    texts.append("héllo wörld — ünïcode ✓ 🚀 日本語 😀👍🏽")
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture
def tiny_cfg(tokenizer) -> ModelConfig:
    return ModelConfig(
        vocab_size=tokenizer.get_vocab_size(), context=48, n_layer=2, n_head=2, d_model=32
    )


def perturbed(model: ShiftableLM, seed: int = 0) -> ShiftableLM:
    """Give every weight (gate rows and specialist branches included) a random nudge, so that
    tests do not pass merely because branches are still copies of the base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


@pytest.fixture
def shiftable(tiny_cfg: ModelConfig) -> ShiftableLM:
    """A model with two specialists whose branches and gate differ from the base."""
    torch.manual_seed(0)
    model = ShiftableLM(tiny_cfg)
    model.add_specialist("ds")
    model.add_specialist("dl")
    model.wake_specialists(["ds", "dl"])
    return perturbed(model)
