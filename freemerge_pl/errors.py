"""The package's named exceptions; every message names the file, key, shape or value at fault."""


class FreeMergeError(ValueError):
    """Base class of every error raised for bad input. ``python cli.py`` prints one as a single line
    (``one_line``), exit status 2; ``--debug`` / ``FREEMERGE_DEBUG=1`` adds the traceback."""


def one_line(err: BaseException) -> str:
    """The error's message on one line (line breaks and runs of spaces collapsed)."""
    return " ".join(str(err).split())


class CheckpointMismatchError(FreeMergeError):
    """Checkpoints disagree on keys, shapes or dtypes."""


class NonFiniteError(FreeMergeError):
    """A checkpoint holds NaN or Inf."""


class HyperparameterError(FreeMergeError):
    """A hyperparameter lies outside its accepted range."""


class ConfigError(FreeMergeError):
    """A configuration is inconsistent (unknown method, task count mismatch, head size, ...)."""
