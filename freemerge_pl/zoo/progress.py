"""Progress lines for the zoo build: plain ``logging`` records (stderr is often not a terminal, so no bar).

``BuildProgress`` knows the build's plan (units of work per kind: task images and pre-training scenes
generated, training samples, inference samples) and a prior time per unit of each kind; each ``stage`` logs
a line at once, and a background thread repeats the current stage's line every ``interval_s`` seconds
(``freemerge_pl.progress.progress_interval()``: ``$FREEMERGE_PROGRESS_SECONDS``, default 10 s) while the
work runs, also through steps that report nothing (a probe's L-BFGS). Every line carries the elapsed time and
an estimate of the time left for the whole build: the units left of each kind times the time per unit
measured so far in this build; a kind not measured yet (run for less than a second) takes its prior times the
slowdown measured on the kinds that have run (a machine 10× slower than the reference is 10× slower at every
kind). Unlike ``freemerge_pl.progress.Ticker`` (one rate for one loop), the build's stages run at very different
rates. Lines say when the machine is loaded (``load_note``: a load average above the build's thread count), the
usual reason a build runs many times longer than its first estimate.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

from freemerge_pl.progress import format_seconds, progress_interval

#: the kinds of work a build plans, and the unit each counts
KINDS = ("data", "scenes", "train", "infer")
UNITS = {"data": "images", "scenes": "scenes", "train": "samples", "infer": "samples"}
#: the heartbeat thread never logs more often than this (``$FREEMERGE_PROGRESS_SECONDS=0``)
MIN_INTERVAL_S = 0.05


def load_note(threads: int, load: float | None = None) -> str:
    """``" (machine loaded: load average 6.2 on 2 build threads; it will run slower)"`` when the 1-minute load
    average (``os.getloadavg``, or ``load``) exceeds ``threads``; else ``""``."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - not POSIX
            return ""
    if load <= threads:
        return ""
    return (f" (machine loaded: load average {load:.1f} on {threads} build thread{'' if threads == 1 else 's'}; "
            f"it will run slower)")


def rough_duration(seconds: float) -> str:
    """``~40 s``, ``~7 min``, ``~1.5 h``: an estimate's precision."""
    if seconds < 90:
        return f"~{max(5, 5 * round(seconds / 5))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


class BuildProgress:
    """Stage lines and periodic lines with elapsed time and an estimate of the time left.

    ``plan``: units of work per kind (``KINDS``) for the whole build; ``prior_s_per_unit``: the expected
    seconds per unit of each kind before it has been measured. Use as a context manager (starts and stops
    the heartbeat thread); ``stage(label, kind, units)`` starts a stage, ``advance(n)`` reports ``n`` units
    of it done. Thread-safe.
    """

    def __init__(self, plan: Mapping[str, float], prior_s_per_unit: Mapping[str, float], logger: logging.Logger,
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 name: str = "zoo", threads: int | None = None) -> None:
        unknown = set(plan) - set(KINDS)
        if unknown:
            raise ValueError(f"BuildProgress: unknown kinds of work {sorted(unknown)}; accepted: {KINDS}")
        self.plan = {k: float(plan.get(k, 0.0)) for k in KINDS}
        self.prior = {k: float(prior_s_per_unit.get(k, 0.0)) for k in KINDS}
        self.log = logger
        self.name = name
        self.threads = threads
        self.interval_s = max(MIN_INTERVAL_S, progress_interval() if interval_s is None else float(interval_s))
        self.clock = clock
        self.done = dict.fromkeys(KINDS, 0.0)
        self.spent = dict.fromkeys(KINDS, 0.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = self._mark = self._last_line = clock()
        self._label = "starting"
        self._kind: str | None = None
        self._stage_units = 0.0
        self._stage_done = 0.0

    # ------------------------------------------------------------------ estimates
    def estimate_total_s(self) -> float:
        """The plan times the prior seconds per unit: the build's expected duration before it starts."""
        return sum(self.plan[k] * self.prior[k] for k in KINDS)

    def _measured(self, kind: str) -> bool:
        return self.spent[kind] >= 1.0 and self.done[kind] > 0

    def slowdown(self) -> float:
        """Measured time over prior time of the work done so far, over the kinds measured (1 before any)."""
        kinds = [k for k in KINDS if self._measured(k) and self.prior[k] > 0]
        expected = sum(self.done[k] * self.prior[k] for k in kinds)
        return sum(self.spent[k] for k in kinds) / expected if expected > 0 else 1.0

    def _rate(self, kind: str) -> float:
        if self._measured(kind):
            return self.spent[kind] / self.done[kind]
        return self.prior[kind] * self.slowdown()

    def _account(self, now: float) -> None:
        if self._kind is not None:
            self.spent[self._kind] += now - self._mark
        self._mark = now

    def remaining_s(self) -> float:
        with self._lock:
            self._account(self.clock())
            return sum(max(0.0, self.plan[k] - self.done[k]) * self._rate(k) for k in KINDS)

    def elapsed_s(self) -> float:
        return self.clock() - self._start

    # ------------------------------------------------------------------ reporting
    def status(self) -> str:
        """``zoo build: <stage> 320/2000 samples, elapsed 3m10s, eta 4m05s (whole build)``, plus a note when
        the machine is loaded (``load_note``)."""
        left = self.remaining_s()
        with self._lock:
            part = ""
            if self._stage_units > 0 and self._kind is not None:
                part = f" {int(self._stage_done)}/{int(self._stage_units)} {UNITS[self._kind]}"
            load = load_note(self.threads) if self.threads else ""
            return (f"{self.name} build: {self._label}{part}, elapsed {format_seconds(self.elapsed_s())}, "
                    f"eta {format_seconds(left)} (whole build){load}")

    def _emit(self) -> None:
        line = self.status()
        with self._lock:
            self._last_line = self.clock()
        self.log.info(line)

    def stage(self, label: str, kind: str, units: float) -> None:
        """Start a stage of ``units`` units of ``kind`` work, and log its line."""
        if kind not in KINDS:
            raise ValueError(f"BuildProgress.stage: kind={kind!r}; accepted: {KINDS}")
        with self._lock:
            self._account(self.clock())
            self._label, self._kind = label, kind
            self._stage_units, self._stage_done = float(units), 0.0
        self._emit()

    def advance(self, units: float = 1.0) -> None:
        """``units`` more units of the current stage are done."""
        with self._lock:
            self._account(self.clock())
            self._stage_done += units
            if self._kind is not None:
                self.done[self._kind] += units

    def skip(self, kind: str, units: float) -> None:
        """``units`` of ``kind`` work are not needed (a stage reused from an interrupted build's staging)."""
        with self._lock:
            self.plan[kind] = max(0.0, self.plan[kind] - float(units))

    def finish(self) -> None:
        """Close the last stage (its time is accounted) and stop the heartbeat."""
        with self._lock:
            self._account(self.clock())
            self._kind = None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def seconds_by_kind(self) -> dict[str, float]:
        with self._lock:
            return {k: round(v, 2) for k, v in self.spent.items()}

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(self.interval_s, 1.0)):
            with self._lock:
                due = self.clock() - self._last_line >= self.interval_s
            if due:
                self._emit()

    def __enter__(self):
        self._thread = threading.Thread(target=self._heartbeat, name="zoo-build-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


__all__ = ["KINDS", "UNITS", "BuildProgress", "load_note", "rough_duration"]
