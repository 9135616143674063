"""Training progress: an interactive bar on a terminal, plain log lines when the output is not one.

A progress bar redraws its line with carriage returns; written to a file or a CI log, every redraw lands on one
ever-growing line. So the bar is used only when its stream is a terminal; otherwise the loop's logged steps are
written as ordinary log lines (logger "singer_deploy.train.progress"), at most one every `every_s` seconds plus the
first and the last: step, the loss terms, images per second and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO

from tqdm.auto import tqdm

log = logging.getLogger(__name__)

PLAIN_EVERY_S = 10.0
TERMS = ("loss", "kd", "out", "info")     # the loss terms a progress line shows (metrics.jsonl keeps every one)


class Progress:
    """Progress of steps `start`..`total` (steps already done when resuming count as done)."""

    def __init__(self, start: int, total: int, desc: str, *, enabled: bool = True, stream: IO[str] | None = None,
                 every_s: float = PLAIN_EVERY_S, clock: Callable[[], float] = time.monotonic):
        stream = stream if stream is not None else sys.stderr
        self.interactive = enabled and _is_terminal(stream)
        self.plain = enabled and not self.interactive
        self.bar = tqdm(total=total, initial=start, desc=desc, file=stream, disable=not self.interactive)
        self.start, self.total, self.desc, self.every_s, self.clock = start, total, desc, every_s, clock
        self.began = clock()
        self.last_line: float | None = None

    def advance(self) -> None:
        """One step done."""
        self.bar.update(1)

    def logged(self, record: Mapping[str, float]) -> None:
        """A logged step's record (step, loss terms, img_s): the bar's postfix, or a plain line when one is due."""
        shown = {key: f"{record[key]:.3g}" for key in (*TERMS, "img_s") if key in record}
        if self.interactive:
            self.bar.set_postfix(shown)
            return
        step, now = int(record["step"]), self.clock()
        due = self.last_line is None or now - self.last_line >= self.every_s or step >= self.total
        if self.plain and due:
            self.last_line = now
            log.info(self.line(record, now))

    def line(self, record: Mapping[str, float], now: float) -> str:
        step = int(record["step"])
        terms = " ".join(f"{key} {record[key]:.4g}" for key in TERMS if key in record)
        rate = (step - self.start) / max(now - self.began, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else None
        parts = [f"{self.desc} step {step}/{self.total} ({step / self.total:.0%})", terms]
        if "img_s" in record:
            parts.append(f"{record['img_s']:.1f} img/s")
        parts.append(f"ETA {_duration(eta)}" if step < self.total else f"done in {_duration(now - self.began)}")
        return " | ".join(part for part in parts if part)

    def close(self) -> None:
        self.bar.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
