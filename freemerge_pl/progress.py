"""What the command line prints besides results: logging set-up, the known dependency noise it silences,
the thread count it chooses, and progress as periodic one-line reports when stderr is not a terminal.

* ``setup_logging``: ``freemerge_pl.*`` loggers at INFO to stderr, ``HH:MM:SS message``.
* ``silence_known_noise``: drops Lightning's "💡 Tip" lines and the deprecation warnings raised inside
  dependencies (scoped by message or by the module that warns; the package's own warnings still show).
* ``choose_threads``: ``--threads`` > ``FREEMERGE_THREADS`` > ``OMP_NUM_THREADS`` > usable CPUs minus the
  load average (at least 1), so a shared machine is not oversubscribed.
* ``Ticker`` / ``progress_iter`` (and ``freemerge_pl.callbacks.LineProgressBar``): "what: i/N, elapsed 12s, eta 36s" every few seconds.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from freemerge_pl.errors import ConfigError

LOG = logging.getLogger("freemerge_pl.progress")
T = TypeVar("T")

#: seconds between two progress lines (environment ``FREEMERGE_PROGRESS_SECONDS`` overrides)
DEFAULT_INTERVAL = 10.0

#: Lightning's advertising lines (logged through its rank-zero loggers)
NOISY_LOG_PREFIXES: tuple[str, ...] = ("💡 Tip:",)
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                      "pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")
#: warnings that are about dependencies' internals or deliberate choices of this package, by message regex
NOISY_WARNING_MESSAGES: tuple[str, ...] = (
    r".*does not have many workers",  # the zoo/toy datasets are in memory: num_workers=0 is deliberate
    r".*in eval mode at the start of training",  # the frozen backbone is in eval mode on purpose
    r"LightningCLI's args parameter",
    r"`LightningModule.configure_optimizers` returned `None`",  # the ncm router is fitted without an optimizer
    r"Total length of `list` across ranks is zero",  # fit without tune-val (data.tune_fraction 0): no val loaders
)
#: dependencies whose own DeprecationWarning/FutureWarning say nothing a user can act on
DEPENDENCY_MODULES = (r"(lightning|pytorch_lightning|lightning_fabric|lightning_utilities|torch|torchvision|"
                      r"torchmetrics|timm|open_clip|transformers|huggingface_hub|jsonargparse)(\.|$)")


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


class _Handler(logging.StreamHandler):
    """The handler ``setup_logging`` installs (recognised so that a second call adds no duplicate)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # follow a replaced sys.stderr (pytest's capsys, redirections)
        super().emit(record)


def setup_logging(level: int = logging.INFO) -> None:
    """``freemerge_pl.*`` loggers print ``HH:MM:SS message`` lines to stderr at ``level`` (idempotent)."""
    logger = logging.getLogger("freemerge_pl")
    logger.setLevel(level)
    if not any(isinstance(h, _Handler) for h in logger.handlers):
        handler = _Handler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


def silence_known_noise() -> None:
    """Drop Lightning's tips and dependencies' deprecation warnings; everything else still shows."""
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes(NOISY_LOG_PREFIXES))
    for message in NOISY_WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=DEPENDENCY_MODULES)


# ------------------------------------------------------------------------------------------------ threads


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _positive_int(name: str, raw: str) -> int:
    try:
        n = int(raw.strip().split(",")[0])  # OMP_NUM_THREADS may list one count per nesting level
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"{name}={raw!r} must be a whole number ≥ 1")
    return n


def choose_threads(explicit: int | None, env: Mapping[str, str], cpus: int, load: float) -> tuple[int, str]:
    """The intra-op thread count and why: ``explicit`` (``--threads``), else ``FREEMERGE_THREADS``, else
    ``OMP_NUM_THREADS``, else ``cpus`` minus the rounded 1-minute ``load`` average, at least 1."""
    if explicit is not None:
        if explicit < 1:
            raise ConfigError(f"--threads={explicit} must be ≥ 1")
        return explicit, "--threads"
    for var in ("FREEMERGE_THREADS", "OMP_NUM_THREADS"):
        if env.get(var, "").strip():
            return _positive_int(var, env[var]), var
    if not math.isfinite(load):
        load = 0.0
    n = max(1, cpus - round(load))
    return n, (f"{cpus} usable CPUs minus load average {load:.1f}; "
               f"set --threads or FREEMERGE_THREADS to choose")


def apply_threads(explicit: int | None = None) -> int:
    """Choose (``choose_threads``), set torch's intra-op thread count and log the choice in one line."""
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    n, why = choose_threads(explicit, os.environ, usable_cpus(), load)
    torch.set_num_threads(n)
    LOG.info(f"threads: {n} ({why})")
    return n


# ------------------------------------------------------------------------------------------------ progress


def progress_interval() -> float:
    """Seconds between progress lines: ``FREEMERGE_PROGRESS_SECONDS`` or ``DEFAULT_INTERVAL``."""
    raw = os.environ.get("FREEMERGE_PROGRESS_SECONDS", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"FREEMERGE_PROGRESS_SECONDS={raw!r} must be a number of seconds ≥ 0")
    return value


def format_seconds(s: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(s):
        return "?"
    s = max(0, round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(what: str, done: int, total: int | None, elapsed: float) -> str:
    """``what: done/total, elapsed E, eta R`` (the eta from the mean time per item so far)."""
    if not total:
        return f"{what}: {done}, elapsed {format_seconds(elapsed)}"
    eta = elapsed / done * (total - done) if done else math.inf
    return f"{what}: {done}/{total}, elapsed {format_seconds(elapsed)}, eta {format_seconds(eta)}"


class Ticker:
    """Logs ``progress_line`` at most every ``interval`` seconds (``update(..., force=True)`` always logs)."""

    def __init__(self, what: str, total: int | None = None, *, interval: float | None = None,
                 log: Callable[[str], Any] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.total = what, total
        self.interval = progress_interval() if interval is None else interval
        self._log = log or LOG.info
        self._clock = clock
        self.start = clock()
        self._last = self.start
        self._last_done: int | None = None

    def elapsed(self) -> float:
        return self._clock() - self.start

    def update(self, done: int, detail: str = "", *, force: bool = False, what: str | None = None) -> bool:
        """Log the line when ``interval`` has passed since the last one (or ``force``); True when logged."""
        now = self._clock()
        if not force and now - self._last < self.interval:
            return False
        self._last, self._last_done = now, done
        line = progress_line(what or self.what, done, self.total, now - self.start)
        self._log(f"{line}{' · ' + detail if detail else ''}")
        return True

    def finish(self, done: int, detail: str = "") -> None:
        """A closing line, when the run lasted long enough to have had progress lines."""
        if self.elapsed() >= self.interval and self._last_done != done:
            self.update(done, detail, force=True)


def stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress_iter(items: Iterable[T], what: str, total: int | None = None, *, unit: str = "it",
                  interval: float | None = None, terminal: bool | None = None) -> Iterator[T]:
    """``items`` with progress: a tqdm bar on a terminal, else a ``Ticker`` line every ``interval`` seconds
    and one at the end. Has the ``(keys, desc)`` shape the merge engine's ``Scan`` takes as ``progress``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if stderr_is_terminal() if terminal is None else terminal:
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=what, total=total, unit=unit, leave=False)
        return
    ticker = Ticker(what, total, interval=interval)
    done = 0
    for item in items:
        yield item
        done += 1
        ticker.update(done)
    ticker.finish(done)


__all__ = ["Ticker", "apply_threads", "choose_threads", "format_seconds", "progress_iter",
           "progress_line", "setup_logging", "silence_known_noise", "usable_cpus"]
