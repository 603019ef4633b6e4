"""Progress output of every stage: one bar per stage, log lines through it, no library bars.

- :func:`progress` is the bar of a stage. On a terminal it is a live tqdm bar; opened inside
  another one it becomes a detail bar on the line below, cleared when done. When the output is
  not a terminal (CI, a log file) it writes whole lines, no carriage returns: one every
  ``interval`` seconds and a last one when the stage's bar closes; detail bars write nothing.
- :func:`quiet_library_bars` turns off the loading and saving bars of transformers, diffusers,
  huggingface_hub and datasets for a scope (a stage function, or the whole command) and restores
  them after.
- :func:`progress_output` is set up once by the command layer: log records are written through
  the bars (``tqdm.contrib.logging``) so that neither breaks the other, and library bars are off.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm as auto_tqdm
from tqdm.std import tqdm as std_tqdm

PLAIN_INTERVAL = 60.0  # seconds between two progress lines when the output is not a terminal
PLAIN_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
PLAIN_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}{postfix}]"

_open_bars: weakref.WeakSet = weakref.WeakSet()  # bars of this process now open (an abandoned one leaves when collected)


class _Nesting:
    """Keeps ``_open_bars`` up to date as a bar closes or its iteration ends."""

    def close(self) -> None:
        _open_bars.discard(self)
        super().close()

    def __iter__(self):
        try:
            yield from super().__iter__()
        finally:
            _open_bars.discard(self)


class TerminalBar(_Nesting, auto_tqdm):
    """A live tqdm bar (a terminal, or a notebook widget)."""


class PlainBar(_Nesting, std_tqdm):
    """tqdm for logs: a whole line at most every ``interval`` seconds and one when it closes
    (if ``leave``), never a carriage return or a cursor move."""

    def __init__(self, *args: Any, interval: float = PLAIN_INTERVAL, **kwargs: Any):
        self.interval = interval
        self._last_line, self._last_line_n = time.monotonic(), None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clearing the line: nothing to clear in a log
            return False
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._write_line(now)
        return True

    def _write_line(self, now: float) -> None:
        self._last_line, self._last_line_n = now, self.n
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()

    def clear(self, nolock: bool = False) -> None:
        pass

    def moveto(self, n: int) -> None:
        pass

    def close(self) -> None:
        if not self.disable and self.leave and self.n != self._last_line_n:
            self._write_line(time.monotonic())
        self.leave = False  # tqdm's own close then writes nothing
        super().close()


def _live(file: TextIO) -> bool:
    """Whether ``file`` shows a live bar: a terminal, or a notebook's stderr."""
    if getattr(file, "isatty", lambda: False)():
        return True
    return file is sys.stderr and "ipykernel" in sys.modules


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: float | None = None,
    unit: str = "it",
    position: int = 0,
    disable: bool = False,
    file: TextIO | None = None,
    interval: float = PLAIN_INTERVAL,
    **kwargs: Any,
) -> std_tqdm:
    """The progress bar of a stage (a tqdm; ``update``, ``set_postfix``, iteration, ``with``).

    Inside another open bar it is a detail bar: one line further down, cleared when it closes,
    silent when the output is not a terminal. ``position`` offsets the line (one per process)."""
    file = sys.stderr if file is None else file
    nested = bool(_open_bars)
    common = dict(desc=desc, total=total, unit=unit, disable=disable, file=file, **kwargs)
    if _live(file):
        bar = TerminalBar(iterable, position=position + len(_open_bars), leave=not nested, dynamic_ncols=True, **common)
    else:
        if nested:
            common["disable"] = True
        bar_format = PLAIN_FORMAT if total is not None or hasattr(iterable, "__len__") else PLAIN_FORMAT_NO_TOTAL
        bar = PlainBar(iterable, interval=interval, leave=True, mininterval=min(interval, 10.0), bar_format=bar_format, **common)
    _open_bars.add(bar)
    return bar


def _library_bar_switches() -> list[tuple[Any, Any, Any]]:
    """(is_enabled, enable, disable) of each installed library's global progress-bar switch;
    huggingface_hub last, because transformers' switch sets it too."""
    switches = []
    try:
        from transformers.utils import logging as transformers_logging

        switches.append((transformers_logging.is_progress_bar_enabled, transformers_logging.enable_progress_bar, transformers_logging.disable_progress_bar))
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as diffusers_logging

        switches.append((diffusers_logging.is_progress_bar_enabled, diffusers_logging.enable_progress_bar, diffusers_logging.disable_progress_bar))
    except ImportError:
        pass
    try:
        import datasets

        switches.append((lambda: not datasets.are_progress_bars_disabled(), datasets.enable_progress_bars, datasets.disable_progress_bars))
    except ImportError:
        pass
    try:
        from huggingface_hub import utils as hub_utils

        switches.append((lambda: not hub_utils.are_progress_bars_disabled(), hub_utils.enable_progress_bars, hub_utils.disable_progress_bars))
    except ImportError:
        pass
    return switches


@contextmanager
def quiet_library_bars() -> Iterator[None]:
    """Turn off the progress bars of transformers ("Loading weights"), diffusers ("Loading
    pipeline components"), datasets and huggingface_hub inside; restore each as it was.
    Also usable as a decorator."""
    switches = _library_bar_switches()
    was_on = [is_on() for is_on, _, _ in switches]
    with warnings.catch_warnings():  # an environment variable that pins a switch wins; no warning
        warnings.simplefilter("ignore")
        for _, _, off in switches:
            off()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for (_, on, off), on_before in zip(switches, was_on):
                (on if on_before else off)()


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]


@contextmanager
def progress_output() -> Iterator[None]:
    """For the command layer, around a whole command: log records (and Python warnings) on the
    console are written through the open bars, and the libraries' own bars are off."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    with ExitStack() as stack:
        stack.enter_context(quiet_library_bars())
        if _console_handlers(logging.getLogger()):  # only where logging writes to the console
            logging.captureWarnings(True)
            stack.callback(logging.captureWarnings, False)
            stack.enter_context(logging_redirect_tqdm(tqdm_class=std_tqdm))
        yield
