"""User-facing errors. The CLI prints these as one clear line instead of a traceback."""


class MoGEError(Exception):
    """Base class of errors caused by bad input (config, checkpoint, data, arguments)."""


class InvalidArgumentError(MoGEError, ValueError):
    """An argument with a value outside what is allowed; the message names the argument, its value
    and what is allowed."""


class ArgumentTypeError(MoGEError, TypeError):
    """An argument of the wrong type (or tensor dtype); the message names the argument, what it got
    and what is allowed."""


class InsufficientMemoryError(MoGEError, MemoryError):
    """A requested size that cannot fit in the memory available; raised before anything is allocated."""


class MoGEWarning(UserWarning):
    """Something moge did differently from what was asked (e.g. options ignored on ``--resume``)."""
