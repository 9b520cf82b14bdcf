"""``ammd status [URL]``: a running job's state in a terminal, read from its status endpoint.

``fetch(url)`` reads ``/status`` and ``/healthz``; ``render(snap, health)`` turns them into the
lines printed (a pure function, so what a user sees is tested without a job):

    job demo: training, step 120/300 (40%), weight version 30, running 3m12s
    throughput: learner 1234 tok/s, rollout 5678 tok/s; last weight push 0.12 s
    losses at step 120: loss 0.1234, d_on 0.0421, ... (lr 1.00e-03, grad_norm 0.51)
    evaluation: rouge_l 0.431 at step 100 (best 0.450 at step 80, 5 evaluations)
    buffer: student 120, teacher 64 rows; sampled on-policy rows 0.4 versions old (max 1)
    actors:
      name       kind     state  restarts  last answer  tok/s  node
      student-0  student  alive  0         0.3 s        1234   10.0.0.2
    health: ok

Every field may be missing (an older or a starting job): what is absent is left out.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Optional

DEFAULT_URL = "http://127.0.0.1:8000"
AUX_LOSS_TERMS = ("lr", "grad_norm")  # shown apart from the loss terms


class StatusUnavailable(Exception):
    """The URL does not answer like an ammd status endpoint."""


def fetch(url: str, timeout: float = 5.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(/status, /healthz)`` of the job at ``url``; ``StatusUnavailable`` says why not."""
    base = url.rstrip("/")
    if base.endswith("/status"):
        base = base[: -len("/status")]
    if "://" not in base:
        base = f"http://{base}"
    snap = _get_json(f"{base}/status", timeout)
    if not isinstance(snap, dict) or "step" not in snap or "state" not in snap:
        raise StatusUnavailable(f"{base}/status did not answer with an ammd job's status "
                                f"(no 'step' and 'state'); is URL the job's status.host:status.port?")
    try:
        health = _get_json(f"{base}/healthz", timeout)
    except StatusUnavailable:
        health = {}  # an older job without /healthz still has a status to show
    return snap, health if isinstance(health, dict) else {}


def _get_json(url: str, timeout: float) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as err:
        if err.code == 503:  # /healthz answers 503 with a JSON body when unhealthy
            try:
                return json.loads(err.read())
            except ValueError:
                pass
        raise StatusUnavailable(f"{url} answered HTTP {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise StatusUnavailable(f"no answer from {url} ({reason}); is the job running, and is the URL "
                                f"its status.host:status.port (default {DEFAULT_URL})?") from None
    except ValueError:
        raise StatusUnavailable(f"{url} did not answer JSON; is it an ammd status endpoint?") from None


def render(snap: dict[str, Any], health: Optional[dict[str, Any]] = None,
           now: Optional[float] = None) -> str:
    """The terminal view of a ``/status`` snapshot and a ``/healthz`` answer."""
    now = time.time() if now is None else now
    lines = [_headline(snap, now)]
    for part in (_throughput(snap), _losses(snap), _evaluation(snap), _buffer(snap)):
        if part:
            lines.append(part)
    lines.extend(_actors(snap))
    lines.append(_health(snap, health or {}))
    return "\n".join(lines)


def _headline(snap: dict[str, Any], now: float) -> str:
    step, total = snap.get("step", 0), snap.get("total_steps")
    progress = f"step {step}/{total}" if total else f"step {step}"
    if isinstance(total, int) and total > 0 and isinstance(step, int):
        progress += f" ({100 * step / total:.0f}%)"
    text = f"job {snap.get('name', '?')}: {snap.get('state', '?')}, {progress}"
    if "weight_version" in snap:
        text += f", weight version {snap['weight_version']}"
    started = _num(snap.get("started_at"))
    if started is not None:
        text += f", running {_duration(now - started)}"
    if snap.get("state") == "failed" and snap.get("error"):
        text += f"\n  error: {snap['error']}"
    return text


def _throughput(snap: dict[str, Any]) -> str:
    parts = [f"{who} {value:.0f} tok/s" for who, value in
             (("learner", _num(snap.get("learner_tokens_per_s"))),
              ("rollout", _num(snap.get("rollout_tokens_per_s")))) if value is not None]
    text = f"throughput: {', '.join(parts)}" if parts else ""
    push = _num(snap.get("weight_push_seconds"))
    if push is not None:
        text += f"{'; ' if text else ''}last weight push {push:.2f} s"
    return text


def _losses(snap: dict[str, Any]) -> str:
    losses = snap.get("losses") if isinstance(snap.get("losses"), dict) else {}
    terms = [f"{k} {v:.4g}" for k, v in losses.items() if k not in AUX_LOSS_TERMS and _num(v) is not None]
    if not terms:
        return ""
    aux = [f"{k} {losses[k]:.3g}" for k in AUX_LOSS_TERMS if _num(losses.get(k)) is not None]
    return (f"losses at step {snap.get('step', '?')}: {', '.join(terms)}"
            + (f" ({', '.join(aux)})" if aux else ""))


def _evaluation(snap: dict[str, Any]) -> str:
    evals = [e for e in snap.get("evals") or [] if isinstance(e, dict) and _num(e.get("score")) is not None]
    if not evals:
        return ""
    last, best = evals[-1], max(evals, key=lambda e: e["score"])
    metric = snap.get("metric") or "score"
    return (f"evaluation: {metric} {last['score']:.3f} at step {last.get('step', '?')} "
            f"(best {best['score']:.3f} at step {best.get('step', '?')}, {len(evals)} evaluations)")


def _buffer(snap: dict[str, Any]) -> str:
    rows = (snap.get("buffer") or {}).get("rows_by_source") if isinstance(snap.get("buffer"), dict) else None
    text = ""
    if isinstance(rows, dict) and rows:
        text = "buffer: " + ", ".join(f"{source} {n}" for source, n in rows.items()) + " rows"
    age = snap.get("sampled_age")
    if isinstance(age, dict) and _num(age.get("mean")) is not None:
        text += (f"{'; ' if text else ''}sampled on-policy rows {age['mean']:.1f} versions old"
                 + (f" (max {age['max']})" if age.get("max") is not None else ""))
    return text


def _actors(snap: dict[str, Any]) -> list[str]:
    actors = snap.get("actors") if isinstance(snap.get("actors"), dict) else {}
    if not actors:
        return []
    from services.status import actor_kind  # the same kind a metric label gets
    placement = snap.get("placement") if isinstance(snap.get("placement"), dict) else {}
    table = [("name", "kind", "state", "restarts", "last answer", "tok/s", "node")]
    for name, info in sorted(actors.items()):
        info = info if isinstance(info, dict) else {}
        seen, tps = _num(info.get("last_seen_s")), _num(info.get("tokens_per_s"))
        node = (placement.get(name) or {}).get("node_ip", "") if isinstance(placement.get(name), dict) else ""
        table.append((name, actor_kind(name, info), str(info.get("state", "?")), str(info.get("restarts", 0)),
                      f"{seen:.1f} s" if seen is not None else "-", f"{tps:.0f}" if tps is not None else "-",
                      str(node)))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    rows = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    return ["actors:", *rows]


def _health(snap: dict[str, Any], health: dict[str, Any]) -> str:
    if health.get("status") == "ok":
        return "health: ok"
    reasons = health.get("reasons") or []
    if health.get("status") == "unhealthy":
        return "health: UNHEALTHY\n" + "\n".join(f"  - {r}" for r in reasons)
    return "health: unknown (no /healthz answer)"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _num(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None
