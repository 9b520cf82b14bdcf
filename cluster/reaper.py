"""Kill an embedded Ray cluster's processes once the driver that started it is gone.

``ray.init()`` without an address starts a private cluster (GCS, raylet, workers, agents) under
the driver. A clean exit stops it (``ray.shutdown`` / Ray's atexit hook), but a SIGKILLed driver
runs no hook: with Ray 2.60 the GCS, raylet and workers then exit, yet the raylet's
DashboardAgent and RuntimeEnvAgent ignore SIGTERM and outlive it (reparented to init, forever).

``start_reaper()``, called right after an embedded ``ray.init``, launches this file as a small
detached watchdog. It waits for its parent (the driver) to go away, then SIGKILLs every process
of that Ray session and exits. After a clean exit it finds nothing left and just exits.

A process belongs to the session when it is a Ray process (a ``ray::`` title, or a command line
naming a file of the ray package) that names the session directory in its command line (GCS,
raylet, monitor, dashboard, log monitor) or holds a file open in it (workers and agents rewrite
their command line but keep their logs open); its descendants belong too. Session directories are
unique per cluster (start time and driver pid), so other sessions and non-Ray processes (a
``tail -f`` of the session's logs, say) never match. Standard library only: no ``import ray``.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
_watchdog: subprocess.Popen | None = None  # referenced, so it is never garbage-collected


def start_reaper() -> None:
    """Watch this process from a detached child; call after an embedded ``ray.init`` only."""
    global _watchdog
    import ray
    if not os.path.isdir("/proc"):  # Linux only; elsewhere the old behaviour stays
        return
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    log = open(os.path.join(session_dir, "logs", "ammd_reaper.log"), "ab")
    # -I: no user site or script dir on sys.path; a new session: Ctrl-C in the terminal
    # reaches the driver (which then shuts Ray down itself), not the watchdog.
    _watchdog = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), session_dir],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()


def session_pids(session_dir: str) -> set[int]:
    """Pids of the live processes of the Ray session in ``session_dir`` (see the module doc)."""
    ray_dir = os.path.dirname(importlib.util.find_spec("ray").origin) + "/"
    inside = session_dir.rstrip("/") + "/"
    parent, members = {}, set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            is_ray = argv[0].startswith("ray::") or any(ray_dir in a for a in argv)
            if is_ray and (any(inside in a + "/" for a in argv) or _holds_file_in(pid, inside)):
                members.add(pid)
        except (OSError, IndexError, ValueError):  # gone meanwhile, or not ours to read
            continue
    while True:  # add descendants (an actor's own subprocesses)
        more = {pid for pid, ppid in parent.items() if ppid in members} - members
        if not more:
            return members - {os.getpid()}
        members |= more


def _holds_file_in(pid: int, inside: str) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                return True
        except OSError:
            pass
    return False


def reap(session_dir: str) -> set[int]:
    """SIGKILL the session's processes, again until none is left (the raylet may start a
    worker meanwhile). Returns the pids killed."""
    killed: set[int] = set()
    for _ in range(20):
        pids = session_pids(session_dir)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed |= pids
        time.sleep(POLL_S)
    return killed


def main(driver_pid: int, session_dir: str) -> None:
    while os.getppid() == driver_pid:  # reparented once the driver is gone (no pid-reuse race)
        time.sleep(POLL_S)
    killed = reap(os.path.realpath(session_dir))
    logging.getLogger("ammd.reaper").info(f"driver {driver_pid} gone; killed {len(killed)} "
                                          f"process(es) of {session_dir}: {sorted(killed)}")


if __name__ == "__main__":
    # Its own process (run as a file, stdout into the session's ammd_reaper.log): the ammd
    # log format, set up with the standard library alone.
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[ammd reaper %(asctime)s] %(message)s",
                        datefmt="%H:%M:%S")
    main(int(sys.argv[1]), sys.argv[2])
