"""Prometheus metrics of a job's status snapshot: the families, their samples and the 0.0.4 text.

Each family is declared once (``FAMILIES``) and reads its samples from a ``JobStatus`` snapshot
(the dict described in ``services.status``); a field the snapshot lacks or holds as a non-number
yields no sample. ``samples`` flattens them to ``(name, labels, value)`` so that ``/metrics`` and
the TensorBoard scalars are the same numbers; ``prometheus_text`` writes the exposition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

UP_STATES = frozenset({"alive", "starting"})  # ammd_actor_up is 1 for these
KINDS = ("student", "teacher", "learner", "buffer")

# --- Prometheus text exposition 0.0.4 -----------------------------------------------------------

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]
Sample = tuple[Labels, Any]


@dataclass(frozen=True)
class Family:
    """One metric family: declared once (HELP, TYPE), then one sample per label set.

    ``name`` is the sample name without the ``ammd_`` prefix; counters end in ``_total`` and, as
    in prometheus_client's own 0.0.4 output, are declared under that full name.
    """
    name: str
    type: str
    help: str
    samples: Callable[[dict[str, Any]], Iterable[Sample]]


def _scalar(key: str) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    return lambda snap: [({}, snap.get(key))]


def _buffer_rows(snap: dict[str, Any]) -> Iterable[Sample]:
    rows = mapping(mapping(snap.get("buffer")).get("rows_by_source"))
    return [({"source": str(source)}, n) for source, n in rows.items()]


def _usage(field: str) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    def samples(snap: dict[str, Any]) -> Iterable[Sample]:
        usage = mapping(snap.get("rollout_usage"))
        return [({"source": str(source)}, mapping(use).get(field)) for source, use in usage.items()]
    return samples


def _losses(snap: dict[str, Any]) -> Iterable[Sample]:
    return [({"term": str(term)}, value) for term, value in mapping(snap.get("losses")).items()]


def _eval_score(snap: dict[str, Any]) -> Iterable[Sample]:
    evals = snap.get("evals")
    if not isinstance(evals, list) or not evals:
        return []
    return [({}, mapping(evals[-1]).get("score"))]


def _per_actor(value: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    def samples(snap: dict[str, Any]) -> Iterable[Sample]:
        return [({"actor": str(name), "kind": actor_kind(str(name), mapping(info))}, value(mapping(info)))
                for name, info in mapping(snap.get("actors")).items()]
    return samples


def actor_kind(name: str, info: dict[str, Any]) -> str:
    """The actor's ``kind``, else its name's prefix when that is a known kind, else "unknown"."""
    kind = info.get("kind")
    if isinstance(kind, str) and kind:
        return kind
    prefix = name.split("-", 1)[0]
    return prefix if prefix in KINDS else "unknown"


FAMILIES: tuple[Family, ...] = (
    Family("step", "gauge", "Learner steps done.", _scalar("step")),
    Family("total_steps", "gauge", "Learner steps the job will run.", _scalar("total_steps")),
    Family("weight_version", "gauge", "Version of the weights last pushed to the students.",
           _scalar("weight_version")),
    Family("rollout_tokens_per_s", "gauge", "Rollout tokens generated per second.",
           _scalar("rollout_tokens_per_s")),
    Family("learner_tokens_per_s", "gauge", "Tokens trained on per second.", _scalar("learner_tokens_per_s")),
    Family("buffer_rows", "gauge", "Rows in the replay buffer, by source.", _buffer_rows),
    Family("rows_generated", "gauge", "Rollout rows generated, by source.", _usage("generated")),
    Family("rows_trained", "gauge", "Row uses trained on, by source.", _usage("trained")),
    Family("loss", "gauge", "Last step's losses and training metrics, by term.", _losses),
    Family("eval_score", "gauge", "Latest held-out evaluation score of the student.", _eval_score),
    Family("actor_up", "gauge", "1 while the actor is alive or starting, else 0.",
           _per_actor(lambda info: float(info.get("state") in UP_STATES))),
    Family("actor_restarts_total", "counter", "Times the actor was restarted.",
           _per_actor(lambda info: info.get("restarts"))),
    Family("actor_last_seen_seconds", "gauge", "Seconds since the actor last answered.",
           _per_actor(lambda info: info.get("last_seen_s"))),
)


PREFIX = "ammd_"


def family_samples(family: Family, snap: dict[str, Any]) -> list[tuple[Labels, float]]:
    """The family's numeric samples in ``snap``; None, bools and non-numbers are dropped."""
    out = []
    for labels, value in family.samples(snap):
        value = number(value)
        if value is not None:
            out.append((labels, value))
    return out


def samples(snap: dict[str, Any], families: Iterable[Family] = FAMILIES) -> list[tuple[str, Labels, float]]:
    """Every numeric sample of ``snap`` as ``(full name with the ammd_ prefix, labels, value)``.

    The same numbers ``prometheus_text`` writes, in the same order; TensorBoard logs these so its
    scalars and the scraped metrics agree.
    """
    return [(PREFIX + family.name, labels, value)
            for family in families for labels, value in family_samples(family, snap)]


def prometheus_text(snap: dict[str, Any], families: Iterable[Family] = FAMILIES) -> str:
    """The snapshot as Prometheus text exposition 0.0.4.

    Each family with at least one numeric sample is declared once (``# HELP``, ``# TYPE``) and
    followed by all its samples; non-numeric and None values (and bools) are skipped.
    """
    lines: list[str] = []
    for family in families:
        name = PREFIX + family.name
        found = family_samples(family, snap)
        if not found:
            continue
        lines.append(f"# HELP {name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {name} {family.type}")
        lines.extend(f"{name}{_format_labels(labels)} {_format_value(value)}" for labels, value in found)
    return "\n".join(lines) + "\n" if lines else ""


def _format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items()) + "}"


def _escape_label(value: str) -> str:
    """Backslash, double quote and newline escaped, as the exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: Any) -> str:
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def number(value: Any) -> Optional[float]:
    """``value`` as a float when it is an int or float (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def mapping(value: Any) -> dict:
    """``value`` when it is a dict, else an empty one (snapshots may lack or null any field)."""
    return value if isinstance(value, dict) else {}
