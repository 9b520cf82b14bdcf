"""The job's status endpoint: a read-only FastAPI app served by uvicorn in a thread.

The driver owns a ``JobStatus`` and updates it; the app only reads snapshots of it.
- ``/healthz``: 200 ``{"status": "ok", "state": ...}`` while the job and its actors are healthy,
  503 ``{"status": "unhealthy", "state": ..., "reasons": [...]}`` otherwise (see
  ``health_problems``);
- ``/status``: JSON (step, weight version, buffer rows by source, tokens/s, the last losses and
  their history (with AMM: D_on, D_off, adversary loss), actors' health);
- ``/metrics``: Prometheus text exposition 0.0.4 (see ``services.metrics.FAMILIES``);
- ``/``: the live page (``services.page``): polls ``/status`` and draws progress, the loss terms,
  lr and grad norm, the evaluation score, throughput and the actors' health;
- ``/static/<file>``: the files that page loads (``services.page.STATIC_FILES``, Chart.js
  among them), served here so that the page works offline;
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
  ``evals`` (``[{"step", "weight_version", "score"}]``); ``record_loss`` sets ``losses``;
- also (absent until first measured; readers must tolerate that): ``actors[name]["tokens_per_s"]``
  for each rollout actor, ``weight_push_seconds`` (the last push) and ``weight_pushes``,
  ``sampled_age`` (``{"mean", "max"}``: weight versions the on-policy rows of the last sampled
  batch lag behind), and ``throughput`` (``record_throughput``: ``[{"step", "t",
  "learner_tokens_per_s", "rollout_tokens_per_s"}]``, ``t`` seconds since the job started).
"""
from __future__ import annotations

import copy
import json
import math
import threading
import time
from typing import Any, Optional, Sequence

# The Prometheus side lives in services.metrics; re-exported here for existing importers.
from services.metrics import (CONTENT_TYPE, FAMILIES, KINDS, UP_STATES, Family, actor_kind,  # noqa: F401
                              mapping, number, prometheus_text, samples)
from services.page import STATIC_FILES, page_html, static_file

# Named in the 404 answer: every path the app serves.
ENDPOINTS = ("/", "/healthz", "/status", "/metrics", *(f"/static/{name}" for name in STATIC_FILES))
OK_STATES = frozenset({"alive", "starting", "restarting"})  # an actor in any other state is a problem


class JobStatus:
    """Thread-safe state of a running job; the driver writes, the app reads.

    ``actor_timeout_s``: an actor silent (``last_seen_s``) for longer than this makes ``/healthz``
    answer 503.
    """

    def __init__(self, name: str, total_steps: int, actor_timeout_s: float = 600.0):
        self._lock = threading.Lock()
        self.actor_timeout_s = actor_timeout_s
        self._changes = 0                            # bumped by every write
        self._views: dict[str, tuple[int, Any]] = {}  # what -> (changes when made, the view)
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
            self._changes += 1

    def record_loss(self, step: int, losses: dict[str, float], keep: int = 2000) -> None:
        """Set the last losses and append them to the history (the last ``keep`` steps)."""
        with self._lock:
            self._state["losses"] = losses
            # Every metric of the step: the loss, grad norm and, under AMM, D_on, D_off and
            # the adversary loss, so their curves can be drawn while the job runs.
            history = self._state["history"]
            history.append({"step": step, **losses})
            del history[:-keep]
            self._changes += 1

    def record_throughput(self, step: int, learner_tokens_per_s: float, rollout_tokens_per_s: float,
                          keep: int = 2000) -> None:
        """Append one point to ``throughput`` (the last ``keep``), timed from ``started_at``."""
        with self._lock:
            series = self._state.setdefault("throughput", [])
            series.append({"step": step, "t": time.time() - self._state["started_at"],
                           "learner_tokens_per_s": learner_tokens_per_s,
                           "rollout_tokens_per_s": rollout_tokens_per_s})
            del series[:-keep]
            self._changes += 1

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the state, the caller's to change."""
        with self._lock:
            return copy.deepcopy(self._state)

    def view(self) -> dict[str, Any]:
        """The state as of the last write, shared by every reader: READ ONLY. It is copied at
        most once per write however many readers ask, so a status page polled many times a
        second costs the job nothing per request (a copy per request slowed training 25%)."""
        return self._cached("view", lambda: copy.deepcopy(self._state))

    def status_json(self) -> bytes:
        """``/status``'s body, encoded at most once per write."""
        return self._cached("json", lambda: _json_bytes(self._state))

    def metrics_text(self) -> str:
        """``/metrics``' body, rendered at most once per write."""
        return self._cached("metrics", lambda: prometheus_text(self._state))

    def _cached(self, what: str, make: Any) -> Any:
        with self._lock:
            made = self._views.get(what)
            if made is None or made[0] != self._changes:
                made = self._views[what] = (self._changes, make())
            return made[1]

    def health(self) -> list[str]:
        """``health_problems`` of the current state; empty while healthy."""
        return health_problems(self.view(), self.actor_timeout_s)


def _json_bytes(state: dict[str, Any]) -> bytes:
    """Strict JSON (what a browser's JSON.parse reads): a non-finite number becomes null."""
    def dump(value: Any) -> bytes:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                          default=str).encode()
    try:
        return dump(state)
    except ValueError:  # NaN or inf somewhere (a skipped step's loss, say)
        return dump(_finite(state))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


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
    for name, info in mapping(snap.get("actors")).items():
        problem = _actor_problem(str(name), mapping(info), timeout_s, age)
        if problem:
            problems.append(problem)
    return problems


def _snapshot_age(snap: dict[str, Any], now: float) -> float:
    """Seconds since the snapshot was published; 0 when it has no ``updated_at``."""
    updated = number(snap.get("updated_at"))
    return max(0.0, now - updated) if updated is not None else 0.0


def _actor_problem(name: str, info: dict[str, Any], timeout_s: float, age: float) -> Optional[str]:
    """The one problem of an actor (its state first, then its silence), or None."""
    state = info.get("state", "unknown")
    if state not in OK_STATES:
        error = info.get("last_error")
        return f"{name} is {state}: {error}" if error else f"{name} is {state}"
    last_seen = number(info.get("last_seen_s"))
    if last_seen is not None and last_seen + age > timeout_s:
        return f"{name} silent for {last_seen + age:.0f} s (timeout {timeout_s:g} s)"
    return None


# --- the app ------------------------------------------------------------------------------------

def allowed_hosts(host: str) -> list[str]:
    """The ``Host`` headers the app answers when bound to ``host``: its own name and, on a
    loopback address, the loopback names. A DNS-rebinding page (evil.example resolving to
    127.0.0.1) sends its own name and is refused. Bound to every address (0.0.0.0, ::), the app
    cannot know the names it is reached by and takes any."""
    if host in ("0.0.0.0", "::", ""):
        return ["*"]
    if host in ("127.0.0.1", "localhost", "::1"):
        return ["127.0.0.1", "localhost", "::1", "[::1]"]
    return [host, f"[{host}]" if ":" in host else host]


def make_app(status: JobStatus, hosts: Sequence[str] = ("*",)):
    """The FastAPI app serving ``status`` (routes in the module docstring). Requests whose
    ``Host`` header is not in ``hosts`` get 400 (``allowed_hosts``). The routes nobody needs
    (``/docs``, ``/redoc``, ``/openapi.json``) are off."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="ammd status", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(hosts))

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
        snap = status.view()
        problems = health_problems(snap, status.actor_timeout_s)
        if problems:
            return JSONResponse({"status": "unhealthy", "state": snap.get("state"), "reasons": problems},
                                status_code=503)
        return JSONResponse({"status": "ok", "state": snap.get("state")})

    @app.get("/status")
    def get_status() -> Response:
        return Response(status.status_json(), media_type="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(status.metrics_text(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return page_html()

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        found = static_file(name)
        if found is None:  # only the listed files: the 404 handler names what exists
            raise HTTPException(status_code=404)
        content, media_type = found
        return Response(content, media_type=media_type)

    return app


class StatusServer:
    """uvicorn in a daemon thread; ``port=0`` picks a free port (read back from ``.port``)."""

    def __init__(self, status: JobStatus, host: str = "127.0.0.1", port: int = 8000):
        import uvicorn
        config = uvicorn.Config(make_app(status, allowed_hosts(host)), host=host, port=port, log_level="warning",
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
