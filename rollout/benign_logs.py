"""vLLM log records that are known to be harmless here, each with why, and the filter that
keeps them off the console.

Each entry names the logger that writes the record and a test on the record's formatted
message, written as narrowly as the cause allows: a record that merely resembles one of these
(another layer failing to load, another template error) still reaches the console. A message
is listed only once its cause is understood; one with a fix is fixed instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Benign:
    logger: str                      # the vLLM module's logger (init_logger(__name__))
    matches: Callable[[str], bool]   # on record.getMessage()
    why: str


def _rotary_reload(message: str) -> bool:
    layer, sep, rest = message.partition(": ")
    return bool(sep) and rest == "Failed to load weights" and layer.endswith("RotaryEmbedding")


BENIGN: tuple[Benign, ...] = (
    Benign("vllm.renderers.base", lambda m: "Chat template warmup failed" in m,
           "vLLM 0.32's LLM warms up the model dir's chat template even with skip_tokenizer_init=True "
           "and logs the failure with a traceback; the engines never render a template (the driver "
           "does, cluster/chat.py)"),
    Benign("vllm.model_executor.model_loader.reload.layerwise", _rotary_reload,
           "on every weight push: a rotary layer holds only its cos/sin cache, computed at start-up "
           "and never in a checkpoint, so a reload finds no weights for it and puts the cache it had "
           "back, which is what the engine needs; another layer with nothing loaded is still shown"),
)


class _BenignFilter(logging.Filter):
    def __init__(self, entries: tuple[Benign, ...]):
        super().__init__()
        self.entries = entries

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(e.matches(message) for e in self.entries)


def install() -> None:
    """Add the filter to each listed logger, once per process."""
    by_logger: dict[str, list[Benign]] = {}
    for entry in BENIGN:
        by_logger.setdefault(entry.logger, []).append(entry)
    for name, entries in by_logger.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _BenignFilter) for f in target.filters):
            target.addFilter(_BenignFilter(tuple(entries)))
