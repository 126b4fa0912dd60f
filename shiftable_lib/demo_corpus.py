"""`sma corpus demo`: an offline, reproducible demo corpus built from installed documentation.

Three domains, all from text that ships inside installed Python packages:

- `general`: the pydoc topics and the docstrings of the standard library;
- `datascience`: numpy and scipy docstrings;
- `deeplearning`: torch docstrings.

A document is one pydoc topic, or one module's documentation (its docstring, then a header line
and the docstring of each public member), cut into chunks of at most `CHUNK_CHARS` characters.
The same interpreter and packages give the same bytes every run: modules and members are sorted,
memory addresses and set orders never reach the text, and caps keep whole documents chosen
round-robin over modules. Each domain is written to a hidden temporary folder and renamed into
place, so a crash never leaves a half-written domain, and a folder that already holds text is
never touched.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import io
import os
import pkgutil
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from shiftable_lib.corpus import DOCUMENT_SEPARATOR, split_documents, text_files
from shiftable_lib.durable import fsync_dir, write_file
from shiftable_lib.errors import Conflict

DEMO_DOMAINS: tuple[str, ...] = ("general", "datascience", "deeplearning")
DEFAULT_MAX_BYTES: dict[str, int] = {
    "general": 6_000_000,
    "datascience": 3_000_000,
    "deeplearning": 3_000_000,
}
CHUNK_CHARS = 4000
MIN_DOC_CHARS = 200
MAX_FILE_BYTES = 2_000_000
# Stop importing once this many times the cap is collected: small caps (tests) stay fast, while
# the default caps still see every module, so the round-robin spreads over all of them.
COLLECT_FACTOR = 3

# Standard-library modules with side effects on import (a browser, printing), or that are tests,
# tools or bulk irrelevant to documentation.
STDLIB_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "turtledemo",
        "test",
        "tkinter.test",
        "lib2to3",
        "ensurepip",
        "__main__",
        "__phello__",
    }
)
TEST_PARTS = frozenset({"test", "tests", "idle_test"})

NUMPY_MODULES = (
    "numpy",
    "numpy.char",
    "numpy.ctypeslib",
    "numpy.dtypes",
    "numpy.emath",
    "numpy.exceptions",
    "numpy.fft",
    "numpy.lib",
    "numpy.lib.array_utils",
    "numpy.lib.format",
    "numpy.lib.introspect",
    "numpy.lib.mixins",
    "numpy.lib.npyio",
    "numpy.lib.recfunctions",
    "numpy.lib.scimath",
    "numpy.lib.stride_tricks",
    "numpy.linalg",
    "numpy.ma",
    "numpy.polynomial",
    "numpy.polynomial.chebyshev",
    "numpy.polynomial.hermite",
    "numpy.polynomial.hermite_e",
    "numpy.polynomial.laguerre",
    "numpy.polynomial.legendre",
    "numpy.polynomial.polynomial",
    "numpy.random",
    "numpy.rec",
    "numpy.strings",
    "numpy.testing",
)
SCIPY_MODULES = (
    "scipy",
    "scipy.cluster",
    "scipy.cluster.hierarchy",
    "scipy.cluster.vq",
    "scipy.constants",
    "scipy.differentiate",
    "scipy.fft",
    "scipy.integrate",
    "scipy.interpolate",
    "scipy.io",
    "scipy.io.arff",
    "scipy.io.matlab",
    "scipy.io.wavfile",
    "scipy.linalg",
    "scipy.linalg.blas",
    "scipy.linalg.interpolative",
    "scipy.linalg.lapack",
    "scipy.ndimage",
    "scipy.odr",
    "scipy.optimize",
    "scipy.signal",
    "scipy.signal.windows",
    "scipy.sparse",
    "scipy.sparse.csgraph",
    "scipy.sparse.linalg",
    "scipy.spatial",
    "scipy.spatial.distance",
    "scipy.spatial.transform",
    "scipy.special",
    "scipy.stats",
    "scipy.stats.contingency",
    "scipy.stats.mstats",
    "scipy.stats.qmc",
    "scipy.stats.sampling",
)
# Public torch modules only: nothing that pulls in the compiler stack (torch._dynamo,
# torch._inductor) on purpose, such as torch.compiler, torch.export or torch.onnx.
TORCH_MODULES = (
    "torch",
    "torch.amp",
    "torch.autograd",
    "torch.autograd.forward_ad",
    "torch.autograd.functional",
    "torch.autograd.graph",
    "torch.backends.cudnn",
    "torch.backends.mps",
    "torch.cpu",
    "torch.cuda",
    "torch.distributed",
    "torch.distributions",
    "torch.fft",
    "torch.func",
    "torch.functional",
    "torch.futures",
    "torch.fx",
    "torch.hub",
    "torch.jit",
    "torch.library",
    "torch.linalg",
    "torch.masked",
    "torch.multiprocessing",
    "torch.nested",
    "torch.nn",
    "torch.nn.attention",
    "torch.nn.functional",
    "torch.nn.init",
    "torch.nn.parameter",
    "torch.nn.utils",
    "torch.nn.utils.parametrize",
    "torch.nn.utils.prune",
    "torch.nn.utils.rnn",
    "torch.optim",
    "torch.optim.lr_scheduler",
    "torch.optim.swa_utils",
    "torch.overrides",
    "torch.profiler",
    "torch.random",
    "torch.serialization",
    "torch.signal.windows",
    "torch.sparse",
    "torch.special",
    "torch.testing",
    "torch.utils.checkpoint",
    "torch.utils.data",
    "torch.utils.hooks",
)

LOCAL_PREFIXES = tuple(
    sorted(
        {p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, str(Path.home())) if len(p) > 1}
    )
)
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
BLANK_RUN = re.compile(r"\n{3,}")
# Example output marked "# may vary" can be computed when the docstring is built (scipy.stats
# draws unseeded samples for its distribution docs), so its value is not written.
MAY_VARY = re.compile(r"^([ \t]*)(?!>>>|\.\.\.)\S.*?\s+# may vary$", re.MULTILINE)


@dataclass(frozen=True)
class DemoDomainStats:
    name: str
    documents: int
    bytes: int
    files: tuple[str, ...]
    skipped: bool  # True when the domain folder already had text and was left alone


@dataclass(frozen=True)
class DocGroup:
    """The documents of one module (or one pydoc topic), the unit the caps round-robin over."""

    source: str  # the file stem the documents go to, e.g. "stdlib"
    name: str
    documents: tuple[str, ...]


# --- text ---------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """Text safe inside one document: "\\n" line ends, no trailing blanks, no blank-line runs."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates would not encode
    text = ADDRESS.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = MAY_VARY.sub(r"\1...  # may vary", text)
    return BLANK_RUN.sub("\n\n", text).strip()


def pack(pieces: Iterable[str], limit: int, sep: str = "\n\n") -> list[str]:
    """Join consecutive pieces with `sep` into chunks of at most `limit` characters."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(sep) + len(piece) > limit:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}{sep}{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def split_long(text: str, limit: int) -> list[str]:
    """Cut text longer than `limit` at paragraphs, else at lines, else every `limit` characters."""
    if len(text) <= limit:
        return [text]
    for sep in ("\n\n", "\n"):
        parts = text.split(sep)
        if len(parts) > 1:
            return pack((p for part in parts for p in split_long(part, limit)), limit, sep)
    return [text[i : i + limit] for i in range(0, len(text), limit)]


def chunk_entries(entries: Iterable[str], limit: int = CHUNK_CHARS) -> tuple[str, ...]:
    """Documents of at most `limit` characters, cut between entries where one fits whole."""
    pieces = (piece for entry in entries for piece in split_long(clean_text(entry), limit))
    chunks = (chunk.strip() for chunk in pack((p for p in pieces if p), limit))
    return tuple(chunk for chunk in chunks if len(chunk) >= MIN_DOC_CHARS)


# --- rendering one object -----------------------------------------------------------------------


class _Shown:
    """A stand-in default value whose repr is fixed text (`inspect.Signature` prints reprs)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def default_repr(value: object) -> str:
    """A default value as it should appear in a signature: stable across runs, short."""
    if isinstance(value, (set, frozenset)):
        # Set order depends on the string-hash seed, so sort it.
        items = ", ".join(sorted(map(repr, value)))
        return f"{type(value).__name__}({{{items}}})" if items else f"{type(value).__name__}()"
    if isinstance(value, str) and value.startswith(LOCAL_PREFIXES):
        return "..."  # sys.executable and the like: the same library, another machine's path
    if isinstance(value, enum.Enum):
        return f"{type(value).__name__}.{value.name}"
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):
        return value.__qualname__  # a function or class default, named rather than <...>
    try:
        text = repr(value)
    except Exception:
        return "..."
    if text.startswith("<"):  # such reprs often carry addresses or process state
        return f"<{type(value).__name__}>"
    return text if len(text) <= 80 else "..."


def signature_text(obj: object) -> str:
    """`(a, b=1)` for objects with a signature, else ""; never raises."""
    try:
        sig = inspect.signature(obj)  # type: ignore[arg-type]
        params = [
            p if p.default is p.empty else p.replace(default=_Shown(default_repr(p.default)))
            for p in sig.parameters.values()
        ]
        text = str(sig.replace(parameters=params))
    except Exception:
        return ""
    return text if len(text) <= 400 else "(...)"


def entry(header: str, doc: str | None) -> str | None:
    """A header line followed by a docstring, or None when there is no docstring."""
    if not doc or not doc.strip():
        return None
    return f"{header}\n{doc}"


def get_doc(obj: object) -> str | None:
    try:
        return inspect.getdoc(obj)
    except Exception:
        return None


def is_documented_callable(obj: object) -> bool:
    """Classes, functions, and callables (numpy ufuncs) whose doc is not just their type's."""
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return True
    doc = getattr(obj, "__doc__", None)
    return callable(obj) and isinstance(doc, str) and doc != type(obj).__doc__


def root_of(obj: object) -> str:
    module = getattr(obj, "__module__", None)
    return module.split(".")[0] if isinstance(module, str) else ""


# --- walking modules and classes ----------------------------------------------------------------


class DocWalker:
    """Renders modules as documents, writing each distinct docstring once per domain."""

    def __init__(self, source: str, allowed_roots: Callable[[str], bool]) -> None:
        self.source = source
        self.allowed_roots = allowed_roots
        self.seen_docs: set[str] = set()
        self.seen_classes: set[int] = set()  # ids are never written, only compared

    def take(self, doc: str | None) -> str | None:
        """`doc` the first time this text is met, else None."""
        if not doc or doc in self.seen_docs:
            return None
        self.seen_docs.add(doc)
        return doc

    def module_group(self, module: ModuleType) -> DocGroup:
        entries = [entry(f"module {module.__name__}", self.take(get_doc(module)))]
        for name, obj in public_members(module):
            entries.extend(self.member_entries(module.__name__, name, obj))
        return DocGroup(self.source, module.__name__, chunk_entries(e for e in entries if e))

    def member_entries(self, module_name: str, name: str, obj: object) -> list[str | None]:
        root = root_of(obj)
        if root and not self.allowed_roots(root):
            return []  # e.g. typing.Any imported into a torch module
        qualname = name if module_name == "builtins" else f"{module_name}.{name}"
        if not inspect.isclass(obj):
            return [entry(f"{qualname}{signature_text(obj)}", self.take(get_doc(obj)))]
        if id(obj) in self.seen_classes:
            return []
        self.seen_classes.add(id(obj))
        header = f"class {qualname}{signature_text(obj)}"
        return [entry(header, self.take(get_doc(obj))), *self.class_entries(obj, qualname)]

    def class_entries(self, cls: type, qualname: str) -> list[str | None]:
        """Entries for the public methods and properties of `cls`, inherited ones included."""
        entries: list[str | None] = []
        for name in sorted(n for n in safe_dir(cls) if not n.startswith("_")):
            owner = next((base for base in cls.__mro__ if name in vars(base)), None)
            if owner is None or owner is object or not self.allowed_roots(root_of(owner)):
                continue
            raw = vars(owner)[name]
            obj = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            if inspect.isclass(obj):
                continue  # nested classes are documented where they are exported
            if inspect.isroutine(obj):
                header = f"{qualname}.{name}{signature_text(obj)}"
            elif inspect.isdatadescriptor(obj):
                header = f"property {qualname}.{name}"
            else:
                continue
            entries.append(entry(header, self.take(get_doc(obj))))
        return entries


def safe_dir(obj: object) -> list[str]:
    try:
        return [n for n in dir(obj) if isinstance(n, str)]
    except Exception:
        return []


def public_members(module: ModuleType) -> list[tuple[str, object]]:
    """The module's public, documented callables, sorted by name.

    With `__all__`, its names are the public API. Without, keep only what the module is the
    home of (see `is_home`), so that imported helpers are not documented under every importer.
    """
    exported = getattr(module, "__all__", None)
    has_all = isinstance(exported, (list, tuple))
    names = exported if has_all else safe_dir(module)
    members = []
    for name in sorted({n for n in names if isinstance(n, str) and not n.startswith("_")}):
        try:
            obj = getattr(module, name)
        except Exception:  # lazy or removed attributes may raise anything
            continue
        if inspect.ismodule(obj) or not is_documented_callable(obj):
            continue
        if has_all or is_home(module.__name__, getattr(obj, "__module__", None)):
            members.append((name, obj))
    return members


def is_home(module_name: str, defined_in: object) -> bool:
    """Whether `module_name` is where an object defined in module `defined_in` is documented.

    That is its own module, a parent package re-exporting it (torch.nn for
    torch.nn.modules.linear), or any module re-exporting it from a private one (_collections).
    """
    if not isinstance(defined_in, str):
        return True
    return (
        defined_in == module_name
        or defined_in.startswith(module_name + ".")
        or any(part.startswith("_") for part in defined_in.split("."))
    )


# --- importing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence warnings and anything printed, which some modules do when imported."""
    sink = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        warnings.simplefilter("ignore")
        yield


def quiet_import(name: str) -> ModuleType | None:
    """The module, or None when importing it fails in any way (platform, missing deps, ...)."""
    try:
        with quiet():
            return importlib.import_module(name)
    except (Exception, SystemExit):
        return None


def is_installed_package(module: ModuleType) -> bool:
    """Whether the module lives in site-packages (a third-party shim such as setuptools')."""
    file = getattr(module, "__file__", None)
    parts = Path(file).parts if isinstance(file, str) else ()
    return "site-packages" in parts or "dist-packages" in parts


def skip_stdlib(name: str) -> bool:
    """Whether module `name` is private, a test, or in (or inside) STDLIB_SKIP."""
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    private_or_test = any(p.startswith("_") or p in TEST_PARTS for p in parts)
    return private_or_test or not prefixes.isdisjoint(STDLIB_SKIP)


def walk_stdlib(name: str) -> Iterator[ModuleType]:
    """Module `name` and its public submodules, depth first in name order."""
    module = quiet_import(name)
    if module is None or is_installed_package(module):
        return
    yield module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for sub in sorted(info.name for info in pkgutil.iter_modules(path)):
        full = f"{name}.{sub}"
        if not skip_stdlib(full):
            yield from walk_stdlib(full)


# --- the three domains --------------------------------------------------------------------------


def topic_groups() -> Iterator[DocGroup]:
    """Each pydoc topic (the language reference's sections) is its own group."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield DocGroup("pydoc_topics", f"topic {name}", chunk_entries([topics[name]]))


def general_groups() -> Iterator[DocGroup]:
    yield from topic_groups()
    stdlib = frozenset(sys.stdlib_module_names) | {"builtins"}
    walker = DocWalker("stdlib", lambda root: root in stdlib)
    for top in sorted(sys.stdlib_module_names):
        if not skip_stdlib(top):
            for module in walk_stdlib(top):
                yield walker.module_group(module)


def package_groups(source: str, names: Sequence[str], roots: frozenset[str]) -> Iterator[DocGroup]:
    """Groups for the listed modules of a third-party package; missing modules are skipped."""
    walker = DocWalker(source, lambda root: root in roots)
    for name in sorted(names):
        module = quiet_import(name)
        if module is not None:
            yield walker.module_group(module)


def datascience_groups() -> Iterator[DocGroup]:
    yield from package_groups("numpy", NUMPY_MODULES, frozenset({"numpy"}))
    yield from package_groups("scipy", SCIPY_MODULES, frozenset({"numpy", "scipy"}))


def deeplearning_groups() -> Iterator[DocGroup]:
    yield from package_groups("torch", TORCH_MODULES, frozenset({"torch"}))


GROUP_SOURCES: dict[str, Callable[[], Iterator[DocGroup]]] = {
    "general": general_groups,
    "datascience": datascience_groups,
    "deeplearning": deeplearning_groups,
}


# --- caps ---------------------------------------------------------------------------------------


def doc_cost(doc: str) -> int:
    """Bytes a document adds to a file, separator included (an upper bound on the real size)."""
    return len(doc.encode("utf-8")) + len(DOCUMENT_SEPARATOR)


def collect(groups: Iterator[DocGroup], cap: int) -> list[DocGroup]:
    """Non-empty groups in order, stopping once `COLLECT_FACTOR * cap` bytes are at hand."""
    collected: list[DocGroup] = []
    total = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated attributes warn when looked up
        for group in groups:
            if group.documents:
                collected.append(group)
                total += sum(map(doc_cost, group.documents))
            if total >= COLLECT_FACTOR * cap:
                break
    return collected


def select_round_robin(groups: Sequence[DocGroup], cap: int) -> list[DocGroup]:
    """Keep whole documents within `cap`: each group's first, then each one's second, ...

    so a cap trims the largest modules instead of the ones late in the alphabet.
    """
    kept = [[False] * len(g.documents) for g in groups]
    budget = cap
    for i in range(max((len(g.documents) for g in groups), default=0)):
        for g, keep in zip(groups, kept, strict=True):
            if i < len(g.documents) and doc_cost(g.documents[i]) <= budget:
                keep[i] = True
                budget -= doc_cost(g.documents[i])
    return [
        replace(g, documents=tuple(d for d, k in zip(g.documents, keep, strict=True) if k))
        for g, keep in zip(groups, kept, strict=True)
    ]


# --- writing ------------------------------------------------------------------------------------


def file_contents(groups: Sequence[DocGroup]) -> dict[str, str]:
    """File name -> text: one file per source, split into numbered files past MAX_FILE_BYTES."""
    by_source: dict[str, list[str]] = {}
    for group in groups:
        by_source.setdefault(group.source, []).extend(group.documents)
    files: dict[str, str] = {}
    for source in sorted(by_source):
        parts: list[list[str]] = [[]]
        size = 0
        for doc in by_source[source]:
            if parts[-1] and size + doc_cost(doc) > MAX_FILE_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(doc)
            size += doc_cost(doc)
        for i, docs in enumerate(p for p in parts if p):
            name = f"{source}.txt" if len(parts) == 1 else f"{source}-{i + 1:02d}.txt"
            files[name] = DOCUMENT_SEPARATOR.join(docs) + "\n"
    return files


def write_folder(folder: Path, files: Mapping[str, str]) -> None:
    folder.mkdir()
    for name, text in files.items():
        write_file(folder / name, text.encode("utf-8"))
    fsync_dir(folder)


def existing_stats(name: str, folder: Path) -> DemoDomainStats:
    """Stats of a domain folder that already holds text (decoded leniently: it is not ours)."""
    paths = text_files(folder)
    texts = [p.read_bytes().decode("utf-8", "replace") for p in paths]
    return DemoDomainStats(
        name=name,
        documents=sum(len(split_documents(t)) for t in texts),
        bytes=sum(p.stat().st_size for p in paths),
        files=tuple(p.name for p in paths),
        skipped=True,
    )


def install_folder(tmp: Path, target: Path) -> bool:
    """Move `tmp` to `target` atomically; False when someone else filled `target` first."""
    if target.is_dir() and not any(target.iterdir()):
        os.rmdir(target)  # os.replace cannot replace a directory, even an empty one
    try:
        os.replace(tmp, target)
    except OSError:
        if text_files(target):
            return False  # a concurrent build won the race; its text stays
        raise
    fsync_dir(target.parent)
    return True


def write_domain(data_dir: Path, name: str, groups: Sequence[DocGroup]) -> DemoDomainStats:
    """Write the domain's files through a hidden temporary folder renamed into place."""
    files = file_contents(groups)
    target = data_dir / name
    tmp = data_dir / f".tmp-demo-{name}-{os.getpid()}"
    if not files:  # nothing to document (a zero cap): leave no empty folder behind
        return DemoDomainStats(name, documents=0, bytes=0, files=(), skipped=False)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crashed run that had this pid
        write_folder(tmp, files)
        if not install_folder(tmp, target):
            return existing_stats(name, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return DemoDomainStats(
        name=name,
        documents=sum(len(g.documents) for g in groups),
        bytes=sum(len(text.encode("utf-8")) for text in files.values()),
        files=tuple(sorted(files)),
        skipped=False,
    )


def check_targets(data_dir: Path, domains: Sequence[str]) -> None:
    """Fail before any work when a domain name is unknown or its path holds something else."""
    for name in domains:
        if name not in DEMO_DOMAINS:
            raise ValueError(f"unknown demo domain {name!r}: choose from {', '.join(DEMO_DOMAINS)}")
        target = data_dir / name
        if target.exists() and not target.is_dir():
            raise Conflict(f"{target} exists and is not a folder: move it away first")
        if target.is_dir() and not text_files(target) and any(target.iterdir()):
            raise Conflict(
                f"{target} holds files but no non-empty .txt: move them away or add text first"
            )


def build_demo_corpus(
    data_dir: Path,
    *,
    domains: Sequence[str] = DEMO_DOMAINS,
    max_bytes: Mapping[str, int] | None = None,
) -> list[DemoDomainStats]:
    """Write the demo corpus under data_dir; never touches a domain folder that already holds text.

    Returns one entry per domain, in the order of `domains`. `max_bytes` overrides the per-domain
    caps of DEFAULT_MAX_BYTES. Raises ValueError for an unknown domain and Conflict when a domain
    path holds something other than text, before anything is written.
    """
    data_dir = Path(data_dir)
    check_targets(data_dir, domains)
    caps = {**DEFAULT_MAX_BYTES, **(max_bytes or {})}
    data_dir.mkdir(parents=True, exist_ok=True)
    stats = []
    for name in domains:
        if text_files(data_dir / name):
            stats.append(existing_stats(name, data_dir / name))
            continue
        groups = collect(GROUP_SOURCES[name](), caps[name])
        stats.append(write_domain(data_dir, name, select_round_robin(groups, caps[name])))
    return stats
