"""Where each demo domain's text comes from: pydoc topics and the standard library
(`general`), numpy and scipy (`datascience`), torch (`deeplearning`).

scipy is an optional dependency (the `demo` extra): a build that needs it checks for it before
any work, and says which extra to install.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

from shiftable_lib.demo_corpus.extract import (
    DocGroup,
    DocWalker,
    chunk_entries,
    is_installed_package,
    quiet_import,
)
from shiftable_lib.errors import ShiftableError

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

# Packages a domain cannot be built without, and the extra that installs each: quiet_import
# skips a module that fails to import, so a missing scipy would otherwise leave a domain of
# numpy alone, silently.
REQUIRED_PACKAGES: dict[str, tuple[tuple[str, str], ...]] = {
    "datascience": (("scipy", "demo"),),
}


class MissingExtra(ShiftableError):
    """A demo domain needs a package of an optional extra that is not installed."""


def check_packages(domains: Sequence[str]) -> None:
    """Raise MissingExtra, naming the extra, when a domain's packages are not installed."""
    for name in domains:
        for package, extra in REQUIRED_PACKAGES.get(name, ()):
            if importlib.util.find_spec(package) is None:
                raise MissingExtra(
                    f"the demo domain {name!r} is built from {package}'s documentation, and "
                    f"{package} is not installed: pip install 'shiftable[{extra}]'"
                )


# --- the standard library ----------------------------------------------------------------------


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
