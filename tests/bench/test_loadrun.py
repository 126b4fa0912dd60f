"""Smoke test of `bench.loadrun`: `python -m bench.loadrun` for a few seconds on a tiny home.

Two clients stream for a few seconds while one hot swap (an add, then a delete) runs; the run
must report completed streams, none cut, both operations answered 200, and the memory of
every stack process before and after. The stack's first start trains the tiny profile, hence
`slow`, as the other stack harness tests.

Its SSE reader splits lines as the SSE spec says, at LF only: a token's text may hold U+2028
or U+0085, which the gateway's JSON sends raw and httpx's `iter_lines` takes for line breaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loadrun import ROLES, Stream, read_events
from tests.bench.test_stack import stop_group
from tests.conftest import TINY_DRIFT

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180.0  # about 35 s on the 2-core VM; room for a busy machine


@pytest.mark.slow
def test_a_short_load_run_with_one_swap_cuts_no_stream(tmp_path: Path) -> None:
    report_path = tmp_path / "loadrun.json"
    command = [sys.executable, "-m", "bench.loadrun", "--home", str(tmp_path / "home")]
    command += ["--clients", "2", "--duration", "4", "--swaps", "1", "--documents", "30"]
    command += ["--threads", "1", "--train-threads", "1"]  # as the e2e stacks: shared cores
    command += ["--max-drift", str(TINY_DRIFT)]  # tests/conftest.py says why
    command += ["--json", str(report_path)]
    # its own process group, which the stack it starts joins: on a timeout the whole group is
    # stopped, so that no `sma up` outlives the test
    harness = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = harness.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        stop_group(harness)
        raise AssertionError(f"bench.loadrun ran over {TIMEOUT_S} s") from None
    assert harness.returncode == 0, out[-4000:] + err[-4000:]

    report = json.loads(report_path.read_text())
    streams = report["streams"]
    assert streams["completed"] > 0 and streams["cut"] == 0, streams
    assert streams["started"] == streams["completed"] + streams["rejected_429"]
    assert streams["tokens_per_s"] > 0 and streams["ttft_p50_s"] > 0
    assert report["problems"] == []
    # one swap: an add that publishes a version, a delete that publishes another
    swaps = report["swaps"]
    assert [(s["operation"], s["status"]) for s in swaps] == [("add", 200), ("delete", 200)]
    assert swaps[0]["version_after"] != swaps[0]["version_before"]
    assert swaps[1]["version_before"] == swaps[0]["version_after"] != swaps[1]["version_after"]
    # every stack process, measured on both sides, and the same process on both
    for side in ("before", "after"):
        assert list(report["memory"][side]) == list(ROLES)
        assert all(p["rss_kib"] > 0 for p in report["memory"][side].values())
    for role in ROLES:
        assert report["memory"]["before"][role]["pid"] == report["memory"]["after"][role]["pid"]
    # the markdown tables, as they are pasted into the docs
    assert "| streams cut short | 0 |" in out
    assert all(f"| {role} | " in out for role in ROLES)
    # the swap's corpus was archived by the delete, not left behind
    data = tmp_path / "home" / "data"
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == [
        "dl",
        "ds",
        "general",
    ]


class Chunks:
    """A response whose body arrives in 3-byte chunks (characters split across them)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def iter_bytes(self) -> list[bytes]:
        return [self.body[i : i + 3] for i in range(0, len(self.body), 3)]


def test_the_reader_keeps_unicode_line_separators_inside_an_event() -> None:
    token = {"text": "a\u2028b\x85c\u2029", "token_ids": [7, 8]}
    done = {"finish_reason": "length", "usage": {"completion_tokens": 2}, "version": "v0002"}
    body = f"event: token\ndata: {json.dumps(token, ensure_ascii=False)}\n\n"
    body += f"event: done\r\ndata: {json.dumps(done)}\r\n\r\n"
    stream = Stream(client=0, start=0.0, end=0.0, first=None, tokens=0, outcome="cut")
    read_events(Chunks(body.encode()), stream)  # type: ignore[arg-type]
    assert (stream.outcome, stream.tokens, stream.usage_tokens) == ("completed", 2, 2)
    assert stream.version == "v0002" and stream.odd_separators == 1
