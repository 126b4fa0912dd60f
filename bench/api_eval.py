"""Each domain's held-out perplexity computed from outside, through the OpenAI-compatible API,
against `sma eval`'s, in one run.

`sma eval` scores `eval_windows` evenly spaced windows of each held-out split in-process: each
window's `context` next-token predictions. From outside, the same windows' first `context`
tokens go to `POST /v1/completions` as token ids with `echo`, `logprobs: 0` and `max_tokens: 0`
(a prompt may hold at most `context` tokens, so each window gives `context - 1` predictions:
all but its last), and the perplexity is exp of the mean negative log-probability.

    python -m bench.api_eval --home HOME --url http://127.0.0.1:8000 [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import urllib.request
from pathlib import Path

from shiftable_lib import evaluate, jobs
from shiftable_lib.config import Settings


def api_logprobs(url: str, ids: list[int]) -> list[float]:
    """The log-probability of each token of `ids` after the first, as the API scores it."""
    body = {
        "model": "shiftable",
        "prompt": ids,
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        scored = json.load(reply)["choices"][0]["logprobs"]["token_logprobs"]
    return scored[1:]


def measure(home: Path, url: str, device: str = "auto") -> dict:
    """Per domain: `sma eval`'s held-out perplexity, the API's on the same windows, and the
    relative difference."""
    settings = Settings(home=home, device=device)
    inside = jobs.evaluate_current(settings)
    current = jobs.load_current(settings, "cpu")
    context, windows = current.profile.context, current.profile.eval_windows
    names = [n for n in current.model.experts if (settings.data_dir / n).is_dir()]
    rows = {}
    data = jobs.tokenize_domains(settings, current.tokenizer, names, current.stop_tokens)
    for name, d in data.items():
        total, count = 0.0, 0
        for row in evaluate.held_out_windows(d.heldout, context, windows):
            scored = api_logprobs(url, row[:-1].tolist())  # what fits a prompt: all but the last
            total -= sum(scored)
            count += len(scored)
        outside = math.exp(total / count)
        ours = inside["domains"][name]["model_ppl"]
        rows[name] = {"sma_eval": ours, "api": outside, "difference": outside / ours - 1}
    return {
        "version": inside["version"],
        "profile": inside["profile"],
        "windows": windows,
        "domains": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.home, args.url, args.device)
    print(
        f"version {result['version']} (profile {result['profile']}), "
        f"{result['windows']} windows a domain"
    )
    print("| domain | `sma eval` | through /v1/completions | difference |")
    print("|---|---|---|---|")
    for name, r in result["domains"].items():
        print(f"| {name} | {r['sma_eval']:.3f} | {r['api']:.3f} | {100 * r['difference']:+.2f}% |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
