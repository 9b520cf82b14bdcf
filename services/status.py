"""The job's status endpoint: a read-only FastAPI app served by uvicorn in a thread.

The driver owns a ``JobStatus`` and updates it; the app only reads snapshots of it.
- ``/healthz``: 200 while the job runs;
- ``/status``: JSON (step, weight version, buffer rows by source, tokens/s, the last losses and
  their history (with AMM: D_on, D_off, adversary loss), actors' health);
- ``/metrics``: the numeric fields as Prometheus text;
- ``/``: a small page that polls ``/status`` and plots the loss.
"""
from __future__ import annotations

import copy
import threading
import time
from typing import Any, Optional

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


class JobStatus:
    """Thread-safe state of a running job; the driver writes, the app reads."""

    def __init__(self, name: str, total_steps: int):
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {
            "name": name, "state": "starting", "step": 0, "total_steps": total_steps,
            "weight_version": 0, "buffer": {}, "rollout_usage": {}, "rollout_tokens_per_s": 0.0,
            "learner_tokens_per_s": 0.0, "losses": {}, "history": [], "actors": {},
            "started_at": time.time(), "updated_at": time.time(),
        }

    def update(self, **fields: Any) -> None:
        with self._lock:
            self._state.update(fields)
            self._state["updated_at"] = time.time()

    def record_loss(self, step: int, losses: dict[str, float], keep: int = 2000) -> None:
        with self._lock:
            self._state["losses"] = losses
            # Every metric of the step: the loss, grad norm and, under AMM, D_on, D_off and
            # the adversary loss, so their curves can be drawn while the job runs.
            history = self._state["history"]
            history.append({"step": step, **losses})
            del history[:-keep]

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._state)


def prometheus_text(snap: dict[str, Any]) -> str:
    lines = []

    def gauge(name: str, value: Any, labels: str = "") -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"# TYPE ammd_{name} gauge")
            lines.append(f"ammd_{name}{labels} {float(value)}")

    for key in ("step", "total_steps", "weight_version", "rollout_tokens_per_s", "learner_tokens_per_s"):
        gauge(key, snap.get(key))
    for source, rows in snap.get("buffer", {}).get("rows_by_source", {}).items():
        gauge("buffer_rows", rows, f'{{source="{source}"}}')
    for source, use in snap.get("rollout_usage", {}).items():
        gauge("rows_generated", use.get("generated"), f'{{source="{source}"}}')
        gauge("rows_trained", use.get("trained"), f'{{source="{source}"}}')
    for key, value in snap.get("losses", {}).items():
        gauge(f"loss_{key}", value)
    return "\n".join(lines) + "\n"


def make_app(status: JobStatus):
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, PlainTextResponse

    app = FastAPI(title="ammd status")

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "state": status.snapshot()["state"]}

    @app.get("/status")
    def get_status() -> dict[str, Any]:
        return status.snapshot()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return prometheus_text(status.snapshot())

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
