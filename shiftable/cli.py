"""`sma`: the command line. Every command takes --home (default $SMA_HOME, else ./sma-home)."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from shiftable_lib import logs
from shiftable_lib.config import PROFILES, Settings
from shiftable_lib.corpus import Corpus
from shiftable_lib.errors import ShiftableError
from shiftable_lib.sampling import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    ROUTING_MODES,
    Routing,
    SamplingParams,
    default_max_new_tokens,
)
from shiftable_lib.train import Progress


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("home", "device", "port", "base", "branch_rank")
    overrides = {k: v for k in keys if (v := getattr(args, k, None)) is not None}
    if getattr(args, "command", None) in ("serve", "up") and args.profile:
        overrides["profile"] = args.profile
    return Settings(**overrides)


class ProgressBars:
    """A tqdm bar per training phase, fed by the library's progress callback."""

    def __init__(self) -> None:
        self.bar = None
        self.phase = None

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if p.phase != self.phase:
            self.close()
            self.phase = p.phase
            self.bar = tqdm(total=p.total, desc=p.phase, unit="step", dynamic_ncols=True)
        self.bar.n = p.step
        if not math.isnan(p.loss):
            self.bar.set_postfix(
                loss=f"{p.loss:.3f}", tok_s=f"{p.tokens_per_s:,.0f}", refresh=False
            )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_corpus_demo(args: argparse.Namespace) -> int:
    from shiftable_lib.demo_corpus import build_demo_corpus

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for s in build_demo_corpus(settings.data_dir):
        state = "kept (already has text)" if s.skipped else f"{s.bytes:,} bytes, {s.documents} docs"
        print(f"{s.name:>14}: {state}")
    return 0


def _run_job(job: Callable[[ProgressBars], object]) -> object:
    bars = ProgressBars()
    try:
        return job(bars)
    finally:
        bars.close()


def _print_metrics(metrics: dict) -> None:
    changes = metrics.get("changes", {})
    for name, d in metrics.get("domains", {}).items():
        routing = d.get("routing")
        shown = f"  routing {routing:.2f}" if routing is not None else ""
        if name in changes:  # an add or removal: what it was before, on the same text
            c = changes[name]
            shown += f"  (before {c['before']:.2f}, {100 * c['change']:+.2f}%)"
        print(
            f"  {name:>14}: ppl {d['model_ppl']:.2f} vs generalist {d['generalist_ppl']:.2f}"
            f" (x{d['ratio']:.3f}){shown}"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from shiftable_lib import distributed, jobs

    settings = _settings(args)
    nproc = args.nproc_per_node or settings.nproc_per_node
    if nproc > 1 and not distributed.launched():
        return torchrun(nproc, args.argv)
    try:
        results = _run_job(lambda bars: jobs.train_all(settings, args.profile, bars))
    except BaseException:
        distributed.shutdown()
        raise
    reports = distributed.world().main  # rank 0 speaks for the job
    distributed.shutdown(completed=True)
    if not reports:
        return 0
    for r in results:
        print(r.message)
        _print_metrics(r.metrics)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from shiftable_lib import jobs

    settings = _settings(args)
    done = jobs.import_base(settings, Path(args.path), args.context or 0, args.profile)
    cfg = done.cfg
    print(
        f"imported {done.source['name']} ({done.family}: {cfg.n_layer} layers, d={cfg.d_model}, "
        f"{cfg.n_head} heads / {cfg.kv_heads} key-value heads, context {cfg.context}, "
        f"vocabulary {cfg.vocab_size}) as {done.version}, now the current version"
    )
    return 0


def torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command as `nproc` data-parallel processes on this host, under PyTorch's
    own launcher; its exit status is the job's (one rank failing fails and stops them all)."""
    from shiftable_lib.distributed import torchrun_command

    command = torchrun_command(nproc, "shiftable.cli", argv)
    return subprocess.run(command, check=False).returncode


def cmd_add(args: argparse.Namespace) -> int:
    from shiftable_lib import jobs, plan

    settings = _settings(args)
    print(corpus_line(plan.describe_corpus(settings, args.name)), flush=True)
    r = _run_job(
        lambda bars: jobs.add_specialist(settings, args.name, bars, max_drift=args.max_drift)
    )
    print(r.message)
    _print_metrics(r.metrics)
    return 0


def corpus_line(c: Corpus) -> str:
    """`read data/x: 3 files, 118 documents, 107,289 tokens to train on, 12% held out`."""
    parts = [f"{c.files} file{'s' if c.files != 1 else ''}", f"{c.documents:,} documents"]
    if c.tokens:
        parts.append(f"{'about ' if c.estimated else ''}{c.tokens:,} tokens to train on")
    share = c.heldout_chars / c.chars if c.chars else 0.0
    parts.append(f"{100 * share:.0f}% held out ({c.heldout_documents:,} documents)")
    return f"read {c.dir}: {', '.join(parts)}"


def cmd_remove(args: argparse.Namespace) -> int:
    from shiftable_lib import jobs

    r = _run_job(
        lambda bars: jobs.remove_specialist(
            _settings(args), args.name, args.recalibrate_steps, bars, max_drift=args.max_drift
        )
    )
    print(r.message)
    _print_metrics(r.metrics)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from shiftable_lib import jobs
    from shiftable_lib.generate import Engine, stream

    settings = _settings(args)
    current = jobs.load_current(settings, jobs.configure_torch(settings))
    routing = Routing(mode=args.routing, force=tuple(args.force), exclude=tuple(args.exclude))
    context = current.model.cfg.context
    params = SamplingParams(
        max_new_tokens=default_max_new_tokens(context)
        if args.max_new_tokens is None
        else args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        routing=routing,
    )
    params.validate(context)  # before anything is printed
    routing.allowed(current.model.experts)
    engine = Engine(current.model, current.tokenizer, max_batch=1)
    prompts = [args.prompt] if args.prompt is not None else _interactive(current)
    for prompt in prompts:
        sys.stdout.write(prompt)
        for event in stream(engine, prompt, params):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if event.seq.truncated:
            print(
                f"[prompt left-truncated by {event.seq.truncated} tokens to fit the context]",
                file=sys.stderr,
            )
    return 0


def _interactive(current):
    print(
        f"model {current.id} with specialists: {', '.join(current.model.cfg.specialists) or '-'}"
        "\nType a prompt and press Enter (an empty line or Ctrl-D quits)."
    )
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def cmd_eval(args: argparse.Namespace) -> int:
    from shiftable_lib import jobs

    result = jobs.evaluate_current(_settings(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {result['version']} (profile {result['profile']})")
        _print_metrics(result)
        print(f"  routing accuracy (mean over domains): {result['routing_accuracy']:.3f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.decode import print_table, run_bench

    settings = _settings(args)
    result = run_bench(args.profile, args.quick, settings.device, settings.cuda_graphs)
    print(json.dumps(result, indent=2) if args.json else print_table(result))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    logs.configure(settings.log_format, settings.log_level)
    if args.service == "gateway":
        from gateway.app import main as serve
    elif args.service == "registry":
        from services.registry.server import main as serve
    elif args.service == "training":
        from services.training.server import main as serve
    else:
        from services.inference.server import main as serve
    serve(settings)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from shiftable.stack import up

    return up(_settings(args))


BASE_HELP = (
    "a pretrained model (Hugging Face directory or .gguf file) to import as the generalist "
    "when there is none, instead of training one (default $SMA_BASE)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sma", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--home", help="data, artifacts and state (default $SMA_HOME or ./sma-home)"
    )
    common.add_argument("--device", help="auto | cpu | cuda (default $SMA_DEVICE or auto)")
    sub = parser.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="corpus tools")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", required=True)
    demo = corpus_sub.add_parser("demo", parents=[common], help="build the offline demo corpus")
    demo.set_defaults(func=cmd_corpus_demo)

    t = sub.add_parser(
        "train",
        parents=[common],
        help="train the generalist if there is none, then every specialist",
    )
    t.add_argument("--profile", choices=list(PROFILES), help="default $SMA_PROFILE or cpu")
    t.add_argument("--base", type=Path, help=BASE_HELP)
    t.add_argument(
        "--nproc-per-node",
        type=int,
        help="data-parallel processes on this host, under torchrun (default $SMA_NPROC_PER_NODE"
        " or 1): one per GPU, or CPU processes with gloo",
    )
    t.set_defaults(func=cmd_train)

    drift = argparse.ArgumentParser(add_help=False)
    drift.add_argument(
        "--max-drift",
        type=float,
        default=None,
        metavar="PERCENT",
        help="publish only if no other domain's held-out perplexity gets worse than this "
        "(default: SMA_MAX_DRIFT, 0.5)",
    )
    i = sub.add_parser(
        "import",
        parents=[common],
        help="make a pretrained model (a Hugging Face directory or a .gguf file) the generalist",
    )
    i.add_argument("path", help="a local model directory or .gguf file (nothing is downloaded)")
    i.add_argument(
        "--context",
        type=int,
        help="positions the model serves (default: the checkpoint's, at most 2048)",
    )
    i.add_argument(
        "--profile",
        choices=list(PROFILES),
        help="training settings for specialists grown on it (default $SMA_PROFILE or cpu)",
    )
    i.add_argument(
        "--branch-rank",
        type=int,
        help="rank of each specialist's delta on the base's attention, 0 for a full copy "
        "(default $SMA_BRANCH_RANK or 64)",
    )
    i.set_defaults(func=cmd_import)

    a = sub.add_parser(
        "add-specialist", parents=[common, drift], help="add one specialist (incremental)"
    )
    a.add_argument("name")
    a.set_defaults(func=cmd_add)

    r = sub.add_parser("remove-specialist", parents=[common, drift], help="remove one specialist")
    r.add_argument("name")
    r.add_argument(
        "--recalibrate-steps",
        type=int,
        default=0,
        help="gate steps on the remaining domains after removal (default 0)",
    )
    r.set_defaults(func=cmd_remove)

    g = sub.add_parser(
        "generate", parents=[common], help="stream a completion (no prompt: interactive)"
    )
    g.add_argument("prompt", nargs="?")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"default {DEFAULT_MAX_NEW_TOKENS}, or half the context if smaller "
        "(the prompt keeps the rest)",
    )
    g.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="0 = whole vocabulary")
    g.add_argument("--top-p", type=float, default=DEFAULT_TOP_P)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--routing", default="soft", choices=ROUTING_MODES)
    g.add_argument("--force", action="append", default=[], help="use only this expert")
    g.add_argument("--exclude", action="append", default=[], help="never use this expert")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", parents=[common], help="held-out perplexity and routing")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bench", parents=[common], help="decode and training speed vs Hugging Face GPT-2"
    )
    b.add_argument("--json", action="store_true")
    b.add_argument("--profile", default="cpu", choices=list(PROFILES))
    b.add_argument("--quick", action="store_true", help="fewer tokens (smoke test)")
    b.set_defaults(func=cmd_bench)

    stack = argparse.ArgumentParser(add_help=False, parents=[common])
    stack.add_argument("--profile", choices=list(PROFILES), help="for a first training")
    stack.add_argument("--port", type=int, help="gateway port (default $SMA_PORT or 8000)")
    stack.add_argument("--base", type=Path, help=BASE_HELP)
    s = sub.add_parser("serve", parents=[stack], help="run one server of the stack")
    s.add_argument("service", choices=["registry", "training", "inference", "gateway"])
    s.set_defaults(func=cmd_serve)
    u = sub.add_parser(
        "up",
        parents=[stack],
        help="run the whole stack (registry, training, inference, gateway) until Ctrl-C",
    )
    u.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # for a command that re-runs itself (train under torchrun)
    try:
        return args.func(args)
    except (ShiftableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
