"""Documents from installed Python: docstrings rendered, cleaned and cut into chunks.

The text is stable across runs: members are sorted, memory addresses, local paths and set
orders never reach it, and each distinct docstring is written once per domain.
"""

from __future__ import annotations

import contextlib
import enum
import importlib
import inspect
import io
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

CHUNK_CHARS = 4000
MIN_DOC_CHARS = 200

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
