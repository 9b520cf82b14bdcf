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

from services.actor_names import ROLES, actor_role

UP_STATES = frozenset({"alive", "starting"})  # ammd_actor_up is 1 for these
KINDS = ROLES  # the values of the ``kind`` label
JOB_STATES = ("starting", "evaluating", "training", "finished", "failed")
PREFIX = "ammd_"

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


def _by_label(label: str, read: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    """One sample per key of the mapping ``read(snap)``, the key as ``label``."""
    return lambda snap: [({label: str(key)}, value) for key, value in mapping(read(snap)).items()]


def _usage(field: str) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    def samples(snap: dict[str, Any]) -> Iterable[Sample]:
        usage = mapping(snap.get("rollout_usage"))
        return [({"source": str(source)}, mapping(use).get(field)) for source, use in usage.items()]
    return samples


def _job_state(snap: dict[str, Any]) -> Iterable[Sample]:
    """The enum pattern: one sample per known state, 1 for the current one (an unknown current
    state is added), so ``ammd_job_state{state="failed"} == 1`` can be alerted on."""
    state = snap.get("state")
    if not isinstance(state, str):
        return []
    states = JOB_STATES if state in JOB_STATES else (*JOB_STATES, state)
    return [({"state": s}, float(s == state)) for s in states]


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
    role = actor_role(name)
    return role if role in KINDS else "unknown"


def _field(*path: str) -> Callable[[dict[str, Any]], Any]:
    """``snap[path[0]][path[1]]...``, None where a level is missing or not a dict."""
    def read(snap: dict[str, Any]) -> Any:
        value: Any = snap
        for key in path:
            value = mapping(value).get(key)
        return value
    return read


FAMILIES: tuple[Family, ...] = (
    Family("job_state", "gauge", "1 for the job's current state (starting, evaluating, training, "
           "finished, failed), 0 for the others.", _job_state),
    Family("step", "gauge", "Learner steps done.", _scalar("step")),
    Family("total_steps", "gauge", "Learner steps the job will run.", _scalar("total_steps")),
    Family("weight_version", "gauge", "Version of the weights last pushed to the students.",
           _scalar("weight_version")),
    Family("weight_pushes_total", "counter", "Weight pushes from the learner to the students.",
           _scalar("weight_pushes")),
    Family("weight_push_seconds", "gauge", "Wall seconds of the last weight push, as the driver "
           "waited on it (the learner's export; with the collective transport, until every student "
           "received it).", _scalar("weight_push_seconds")),
    Family("learner_tokens_per_second", "gauge", "Tokens trained on per second of learner steps.",
           _scalar("learner_tokens_per_s")),
    Family("rollout_tokens_per_second", "gauge", "Rollout tokens made per second, all actors together.",
           _scalar("rollout_tokens_per_s")),
    Family("rollout_actor_tokens_per_second", "gauge", "Rollout tokens made per second by each "
           "rollout actor (its requests' rows, since the job's rollouts started).",
           _per_actor(lambda info: info.get("tokens_per_s"))),
    Family("loss", "gauge", "Last step's losses and training metrics, by term (with AMM: d_on, "
           "d_off, adversary_loss).", _by_label("term", _field("losses"))),
    Family("eval_score", "gauge", "Latest held-out evaluation score of the student.", _eval_score),
    Family("buffer_rows", "gauge", "Rows in the replay buffer, by source.",
           _by_label("source", _field("buffer", "rows_by_source"))),
    Family("rows_generated_total", "counter", "Rollout rows generated, by source.", _usage("generated")),
    Family("rows_trained_total", "counter", "Row uses trained on, by source.", _usage("trained")),
    Family("sampled_row_age_versions", "gauge", "Age in weight versions of the on-policy rows of "
           "the last sampled batch (stat: mean, max).", _by_label("stat", _field("sampled_age"))),
    Family("actor_up", "gauge", "1 while the actor is alive or starting, else 0.",
           _per_actor(lambda info: float(info.get("state") in UP_STATES))),
    Family("actor_restarts_total", "counter", "Times the actor was restarted.",
           _per_actor(lambda info: info.get("restarts"))),
    Family("actor_last_seen_seconds", "gauge", "Seconds since the actor last answered.",
           _per_actor(lambda info: info.get("last_seen_s"))),
)


def metric_names(families: Iterable[Family] = FAMILIES) -> set[str]:
    """Every name a sample of ``families`` can carry (with the prefix), for checking queries."""
    return {PREFIX + family.name for family in families}


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
