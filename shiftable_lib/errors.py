"""The few typed errors the library raises; services map them to gRPC codes in one place."""


class ShiftableError(Exception):
    """Base of every error the library raises on purpose; the message is for the user."""


class InvalidName(ShiftableError, ValueError):
    """A specialist name that does not match the allowed pattern."""


class CorpusMissing(ShiftableError, FileNotFoundError):
    """A domain folder that is absent or holds no non-empty .txt file."""


class CorpusInvalid(ShiftableError, ValueError):
    """A corpus file that cannot be used (not UTF-8, unreadable)."""


class CorpusTooSmall(CorpusInvalid):
    """A corpus with too little text to train and evaluate a specialist on."""


class NotFound(ShiftableError, LookupError):
    """A specialist, model version or file that does not exist."""


class Conflict(ShiftableError):
    """The request contradicts the current state (already exists, last specialist, ...)."""


class Busy(ShiftableError):
    """Another operation holds the resource; try again later."""


class AlreadyExists(Conflict):
    """Something with that name exists already."""


class Overloaded(ShiftableError):
    """Too much work queued; try again shortly."""


class Unavailable(ShiftableError):
    """Not ready yet (no model loaded, a dependency down); try again later."""


class VersionInvalid(ShiftableError):
    """A model version whose files fail their check on loading: a size or digest that is not
    what was recorded when it was written, a config or tensors that do not fit together. A
    property of the version, not of the machine loading it."""


class DriftTooLarge(Conflict):
    """A new model that makes other domains worse than the limit allows: not published."""
