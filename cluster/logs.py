"""The job's log and its progress display.

Every module logs through the ``ammd`` logger (``logging.getLogger("ammd")`` or a child such
as ``ammd.trainer``). ``setup()`` gives it one handler that writes ``[ammd HH:MM:SS] msg`` to
stdout, as the job always has: stderr stays for the one ``ammd: error: ...`` line a failed
command ends in, and the command's result (``ammd run``'s JSON) follows the log on stdout.

``progress()`` is the one place that decides how learner steps are shown: a tqdm bar when the
stream is a terminal, else a plain log line every 5% of the steps (a file or a pipe, e.g. a
``ray job submit`` log, gets lines it can grep, never bar redraws).
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Optional, TextIO, Union

from tqdm import tqdm

LOGGER = "ammd"
FORMAT = "[ammd %(asctime)s] %(message)s"
DATEFMT = "%H:%M:%S"


class _StdoutHandler(logging.Handler):
    """Writes to whatever ``sys.stdout`` is at the moment of the record, not at set-up, so a
    redirected or captured stdout (pytest's capsys, ``contextlib.redirect_stdout``) gets the
    lines; through ``tqdm.write``, so a progress bar on the terminal is cleared and redrawn
    around the line instead of being torn by it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stdout
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # logging must never take the job down
            self.handleError(record)


def setup(level: int = logging.INFO) -> logging.Logger:
    """Give the ``ammd`` logger its handler (once) and return it. Idempotent; a handler the
    user attached to ``ammd`` themselves is kept and ours is not added."""
    logger = logging.getLogger(LOGGER)
    if not logger.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
        logger.propagate = False  # a root handler (e.g. Ray's or the user's) must not print it twice
    if logger.level == logging.NOTSET:
        logger.setLevel(level)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    """The ``ammd`` logger (or its child ``ammd.<name>``), set up."""
    setup()
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def info(msg: str) -> None:
    """Log one line at INFO on the ``ammd`` logger: the default ``log`` callable of the
    driver's parts (Trainer, Supervisor), which tests may replace with ``list.append``."""
    get_logger().info(msg)


# --- progress of the learner steps -------------------------------------------------------------

class LineProgress:
    """A log line every ``every`` steps and at the last one, the same line as ever:
    ``step 6/12 loss 0.1234 version 1 rollout 800 tok/s learner 300 tok/s lr 1.00e-03 rows made 96``."""

    def __init__(self, total: int, every: Optional[int] = None, logger: Optional[logging.Logger] = None):
        self.total, self.every = total, every or max(1, total // 20)
        self.logger = logger or get_logger()
        self._last: Optional[int] = None

    def update(self, step: int, stats: dict[str, Any]) -> None:
        """``stats``: loss, lr, version, rollout_tps, learner_tps, rows (missing ones read nan/0)."""
        if step == self._last or not (step % self.every == 0 or step == self.total):
            return  # a skipped (non-finite) step calls again with the same step
        self._last = step
        get, nan = stats.get, float("nan")
        self.logger.info(
            f"step {step}/{self.total} loss {get('loss', nan):.4f} version {get('version', 0)} "
            f"rollout {get('rollout_tps', 0.0):.0f} tok/s learner {get('learner_tps', 0.0):.0f} tok/s "
            f"lr {get('lr', nan):.2e} rows made {get('rows', 0)}")

    def close(self) -> None:
        pass


class BarProgress:
    """A tqdm bar over the learner steps on ``stream``, its postfix the last loss and tok/s."""

    def __init__(self, total: int, start: int = 0, stream: Optional[TextIO] = None):
        self.bar = tqdm(total=total, initial=start, file=stream or sys.stderr, unit="step",
                        desc="ammd", dynamic_ncols=True, leave=True)

    def update(self, step: int, stats: dict[str, Any]) -> None:
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        postfix = {"loss": f"{stats.get('loss', float('nan')):.4f}",
                   "tok/s": f"{stats.get('learner_tps', 0.0):.0f}", "v": stats.get("version", 0)}
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


Progress = Union[LineProgress, BarProgress]


def progress(total: int, start: int = 0, stream: Optional[TextIO] = None) -> Progress:
    """The progress display of ``total`` learner steps (``start`` of them done, after a resume):
    a bar when ``stream`` (default stderr) is an interactive terminal, else plain log lines."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarProgress(total, start, stream)
    return LineProgress(total)
