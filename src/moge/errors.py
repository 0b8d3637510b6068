"""User-facing errors. The CLI prints these as one clear line instead of a traceback."""


class MoGEError(Exception):
    """Base class of errors caused by bad input (config, checkpoint, data, arguments)."""
