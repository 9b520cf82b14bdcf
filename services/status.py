"""The job's status endpoint: a read-only FastAPI app served by uvicorn in a thread.

The driver owns a ``JobStatus`` and updates it; the app only reads snapshots of it.
- ``/healthz``: 200 ``{"status": "ok", "state": ...}`` while the job and its actors are healthy,
  503 ``{"status": "unhealthy", "state": ..., "reasons": [...]}`` otherwise (see
  ``health_problems``);
- ``/status``: JSON (step, weight version, buffer rows by source, tokens/s, the last losses and
  their history (with AMM: D_on, D_off, adversary loss), actors' health);
- ``/metrics``: Prometheus text exposition 0.0.4 (see ``FAMILIES``);
- ``/``: a small page that polls ``/status`` and plots the loss;
- any other path: 404 ``{"error": "no such endpoint /x", "endpoints": [...]}``; another method
  than GET: 405 ``{"error": ..., "allowed": ["GET"]}``.

What the driver sets (all through ``JobStatus.update``):
- ``state``: "starting", "evaluating", "training", "finished" or "failed"; with "failed", also
  ``error=`` (a one-line description) so that ``/healthz`` can say why;
- ``actors``: ``{name: {"state": "alive"|"dead"|"restarting"|"starting", "last_seen_s": float|None,
  "restarts": int, "last_error": str|None, "kind": "student"|"teacher"|"learner"|"buffer"}}``, where
  ``last_seen_s`` is the seconds since the actor last answered anything, measured when the driver
  publishes. Every key but the name may be missing (older snapshots carry only state and
  last_seen_s): a missing kind is read from the name's prefix ("student-0" -> "student");
- ``step``, ``weight_version``, ``buffer`` (``rows_by_source``), ``rollout_usage``
  (``{source: {"generated", "trained"}}``), ``rollout_tokens_per_s``, ``learner_tokens_per_s``,
  ``evals`` (``[{"step", "weight_version", "score"}]``); ``record_loss`` sets ``losses``.
"""
from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

_PAGE = """<!doctype html><html><head><title>ammd</title><meta charset="utf-8">
<style>body{font:14px sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}</style></head>
<body><h1>ammd job <span id="name"></span></h1><p id="state"></p>
<canvas id="plot" width="640" height="240" style="border:1px solid #ccc"></canvas>
<pre id="raw"></pre><script>
async function tick(){const s=await (await fetch('status')).json();
document.getElementById('name').textContent=s.name;
document.getElementById('state').textContent=`${s.state}: step ${s.step}/${s.total_steps}, weight version ${s.weight_version}`;
document.getElementById('raw').textContent=JSON.stringify(s,null,2);
const c=document.getElementById('plot').getContext('2d'),h=s.history;c.clearRect(0,0,640,240);
const keys=['loss','d_on','d_off','adversary_loss'].filter(k=>h.some(p=>k in p)),col=['#000','#c00','#06c','#090'];
keys.forEach((k,j)=>{const pts=h.filter(p=>k in p);if(pts.length<2)return;const ys=pts.map(p=>p[k]),
lo=Math.min(...ys),hi=Math.max(...ys);c.strokeStyle=col[j];c.fillText(k,8,14+12*j);c.beginPath();
pts.forEach((p,i)=>{const x=i*640/(pts.length-1),y=230-(p[k]-lo)/(hi-lo||1)*200;i?c.lineTo(x,y):c.moveTo(x,y)});c.stroke();});}
tick();setInterval(tick,2000);</script></body></html>"""


ENDPOINTS = ("/", "/healthz", "/status", "/metrics")  # named in the 404 answer
OK_STATES = frozenset({"alive", "starting", "restarting"})  # an actor in any other state is a problem
UP_STATES = frozenset({"alive", "starting"})  # ammd_actor_up is 1 for these
KINDS = ("student", "teacher", "learner", "buffer")


class JobStatus:
    """Thread-safe state of a running job; the driver writes, the app reads.

    ``actor_timeout_s``: an actor silent (``last_seen_s``) for longer than this makes ``/healthz``
    answer 503.
    """

    def __init__(self, name: str, total_steps: int, actor_timeout_s: float = 600.0):
        self._lock = threading.Lock()
        self.actor_timeout_s = actor_timeout_s
        self._state: dict[str, Any] = {
            "name": name, "state": "starting", "error": None, "step": 0, "total_steps": total_steps,
            "weight_version": 0, "buffer": {}, "rollout_usage": {}, "rollout_tokens_per_s": 0.0,
            "learner_tokens_per_s": 0.0, "losses": {}, "history": [], "actors": {},
            "started_at": time.time(), "updated_at": time.time(),
        }

    def update(self, **fields: Any) -> None:
        """Merge ``fields`` into the state (see the module docstring for the keys read back)."""
        with self._lock:
            self._state.update(fields)
            self._state["updated_at"] = time.time()

    def record_loss(self, step: int, losses: dict[str, float], keep: int = 2000) -> None:
        """Set the last losses and append them to the history (the last ``keep`` steps)."""
        with self._lock:
            self._state["losses"] = losses
            # Every metric of the step: the loss, grad norm and, under AMM, D_on, D_off and
            # the adversary loss, so their curves can be drawn while the job runs.
            history = self._state["history"]
            history.append({"step": step, **losses})
            del history[:-keep]

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the state, safe to read without the lock."""
        with self._lock:
            return copy.deepcopy(self._state)

    def health(self) -> list[str]:
        """``health_problems`` of the current snapshot; empty while healthy."""
        return health_problems(self.snapshot(), self.actor_timeout_s)


# --- health -------------------------------------------------------------------------------------

def health_problems(snap: dict[str, Any], timeout_s: float, now: Optional[float] = None) -> list[str]:
    """Why the job is unhealthy, one line per problem; an empty list means healthy.

    - a finished job is healthy, whatever its actors (they are being stopped);
    - a failed job is a problem (with ``snap["error"]`` if set), listed before its actors';
    - every actor whose state is not alive/starting/restarting is a problem (with its last_error);
    - every other actor silent for longer than ``timeout_s`` is a problem. Silence is the
      snapshot's ``last_seen_s`` plus the time since the snapshot was published (``updated_at``,
      against ``now``, default the clock), so a driver that stopped publishing cannot look healthy.
      ``last_seen_s`` None (never answered yet) is not judged.
    """
    state = snap.get("state")
    if state == "finished":
        return []
    problems = []
    if state == "failed":
        error = snap.get("error")
        problems.append(f"job failed: {error}" if error else "job failed")
    age = _snapshot_age(snap, time.time() if now is None else now)
    for name, info in _mapping(snap.get("actors")).items():
        problem = _actor_problem(str(name), _mapping(info), timeout_s, age)
        if problem:
            problems.append(problem)
    return problems


def _snapshot_age(snap: dict[str, Any], now: float) -> float:
    """Seconds since the snapshot was published; 0 when it has no ``updated_at``."""
    updated = _number(snap.get("updated_at"))
    return max(0.0, now - updated) if updated is not None else 0.0


def _actor_problem(name: str, info: dict[str, Any], timeout_s: float, age: float) -> Optional[str]:
    """The one problem of an actor (its state first, then its silence), or None."""
    state = info.get("state", "unknown")
    if state not in OK_STATES:
        error = info.get("last_error")
        return f"{name} is {state}: {error}" if error else f"{name} is {state}"
    last_seen = _number(info.get("last_seen_s"))
    if last_seen is not None and last_seen + age > timeout_s:
        return f"{name} silent for {last_seen + age:.0f} s (timeout {timeout_s:g} s)"
    return None


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
    rows = _mapping(_mapping(snap.get("buffer")).get("rows_by_source"))
    return [({"source": str(source)}, n) for source, n in rows.items()]


def _usage(field: str) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    def samples(snap: dict[str, Any]) -> Iterable[Sample]:
        usage = _mapping(snap.get("rollout_usage"))
        return [({"source": str(source)}, _mapping(use).get(field)) for source, use in usage.items()]
    return samples


def _losses(snap: dict[str, Any]) -> Iterable[Sample]:
    return [({"term": str(term)}, value) for term, value in _mapping(snap.get("losses")).items()]


def _eval_score(snap: dict[str, Any]) -> Iterable[Sample]:
    evals = snap.get("evals")
    if not isinstance(evals, list) or not evals:
        return []
    return [({}, _mapping(evals[-1]).get("score"))]


def _per_actor(value: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Iterable[Sample]]:
    def samples(snap: dict[str, Any]) -> Iterable[Sample]:
        return [({"actor": str(name), "kind": actor_kind(str(name), _mapping(info))}, value(_mapping(info)))
                for name, info in _mapping(snap.get("actors")).items()]
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


def prometheus_text(snap: dict[str, Any], families: Iterable[Family] = FAMILIES) -> str:
    """The snapshot as Prometheus text exposition 0.0.4.

    Each family with at least one numeric sample is declared once (``# HELP``, ``# TYPE``) and
    followed by all its samples; non-numeric and None values (and bools) are skipped.
    """
    lines: list[str] = []
    for family in families:
        name = f"ammd_{family.name}"
        samples = [(labels, value) for labels, value in family.samples(snap)
                   if _number(value) is not None]
        if not samples:
            continue
        lines.append(f"# HELP {name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {name} {family.type}")
        lines.extend(f"{name}{_format_labels(labels)} {_format_value(value)}" for labels, value in samples)
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


def _number(value: Any) -> Optional[float]:
    """``value`` as a float when it is an int or float (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _mapping(value: Any) -> dict:
    """``value`` when it is a dict, else an empty one (snapshots may lack or null any field)."""
    return value if isinstance(value, dict) else {}


# --- the app ------------------------------------------------------------------------------------

def make_app(status: JobStatus):
    """The FastAPI app serving ``status`` (routes in the module docstring)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from starlette.exceptions import HTTPException

    app = FastAPI(title="ammd status")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException) -> JSONResponse:
        # A wrong path or method gets JSON that says what exists, not Starlette's bare text.
        path = request.url.path
        if exc.status_code == 404:
            return JSONResponse({"error": f"no such endpoint {path}", "endpoints": list(ENDPOINTS)},
                                status_code=404)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("Allow", "GET")
            allowed = sorted({m.strip() for m in allow.split(",") if m.strip()} - {"HEAD"}) or ["GET"]
            return JSONResponse({"error": f"method {request.method} is not allowed on {path}; use "
                                          f"{' or '.join(allowed)}", "allowed": allowed},
                                status_code=405, headers={"Allow": allow})
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        snap = status.snapshot()
        problems = health_problems(snap, status.actor_timeout_s)
        if problems:
            return JSONResponse({"status": "unhealthy", "state": snap.get("state"), "reasons": problems},
                                status_code=503)
        return JSONResponse({"status": "ok", "state": snap.get("state")})

    @app.get("/status")
    def get_status() -> dict[str, Any]:
        return status.snapshot()

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(prometheus_text(status.snapshot()), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _PAGE

    return app


class StatusServer:
    """uvicorn in a daemon thread; ``port=0`` picks a free port (read back from ``.port``)."""

    def __init__(self, status: JobStatus, host: str = "127.0.0.1", port: int = 8000):
        import uvicorn
        config = uvicorn.Config(make_app(status), host=host, port=port, log_level="warning",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="ammd-status", daemon=True)
        self.host = host
        self.port: Optional[int] = None

    def start(self, timeout: float = 10.0) -> "StatusServer":
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"status server did not start on {self.host} "
                                   f"(is the port taken? set status.port)")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"
