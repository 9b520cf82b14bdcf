"""A SIGKILLed driver leaves no Ray process of its embedded cluster behind (cluster.reaper)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import os, sys, time
import ray
from cluster.config import build_config
from cluster.driver import init_ray

init_ray(build_config({"ray": {"num_cpus": 2}}))

@ray.remote(num_cpus=0)
class Pinger:
    def pid(self):
        return os.getpid()

pinger = Pinger.remote()
ray.get(pinger.pid.remote())
print("session", ray._private.worker._global_node.get_session_dir_path(), flush=True)
print("ready", flush=True)
if sys.argv[1] == "wait":
    time.sleep(600)
"""


def start_time(pid: int) -> str | None:
    """The process's start time (guards against pid reuse); None once gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def descendants(root: int) -> dict[int, str]:
    """Live descendants of ``root``: pid -> start time."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid and p not in found]
        found.update(kids)
        todo.extend(kids)
    return {p: t for p in found if (t := start_time(p)) is not None}


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start_driver(mode: str, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    session_dir = None
    for line in proc.stdout:
        if line.startswith("session "):
            session_dir = line.split(" ", 1)[1].strip()
        elif line.strip() == "ready":
            return proc, session_dir
    raise AssertionError(f"driver exited with {proc.wait()} before it was ready")


def wait_gone(pids: dict[int, str], timeout: float) -> dict[int, str]:
    deadline = time.time() + timeout
    while True:
        alive = {p: t for p, t in pids.items() if start_time(p) == t}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.5)


@pytest.mark.slow
def test_sigkilled_driver_leaves_no_ray_process_and_a_new_job_starts():
    # Our own Ray temp dir, holding a stale ray_current_cluster (as `ray stop` leaves): without
    # address="local" the embedded ray.init would try to join it and fail.
    tmp = tempfile.mkdtemp(prefix="ray_reaper_", dir="/tmp")
    os.makedirs(f"{tmp}/ray")
    Path(f"{tmp}/ray/ray_current_cluster").write_text("127.0.0.1:1\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=tmp, RAY_AUTH_MODE="disabled")
    drivers, decoys, tree = [], [], {}
    try:
        driver, session_dir = start_driver("wait", env)
        drivers.append(driver)
        assert session_dir.startswith(f"{tmp}/ray/session_")
        tree = descendants(driver.pid)
        titles = [cmdline(p) for p in tree]
        assert any("raylet" in t for t in titles) and any(t.startswith("ray::Pinger") for t in titles)
        assert any("reaper.py" in t for t in titles)
        # Not of the session: a look-alike path, and a reader of the session's logs (tail -f).
        sleeper = "import sys, time; time.sleep(600)"
        reader = "import sys, time; f = open(sys.argv[1]); time.sleep(600)"
        decoys = [subprocess.Popen([sys.executable, "-c", sleeper, session_dir + "_other/logs"]),
                  subprocess.Popen([sys.executable, "-c", reader, f"{session_dir}/logs/raylet.out"])]
        time.sleep(1)

        driver.send_signal(signal.SIGKILL)
        driver.wait()
        left = wait_gone(tree, timeout=30)  # the reaper itself exits too
        assert not left, {p: cmdline(p) for p in left}
        assert not [p for p in map(int, filter(str.isdigit, os.listdir("/proc")))
                    if session_dir + "/" in cmdline(p) + "/" and p not in {d.pid for d in decoys}]
        assert all(d.poll() is None for d in decoys), "a process outside the session was killed"
        log = Path(f"{session_dir}/logs/ammd_reaper.log").read_text()
        assert f"driver {driver.pid} gone" in log

        # A second embedded job starts right after, beside the stale file, and exits cleanly.
        second, second_dir = start_driver("exit", env)
        drivers.append(second)
        assert second_dir != session_dir
        second_tree = descendants(second.pid)
        assert second.wait(timeout=60) == 0
        assert not wait_gone(second_tree, timeout=30)
        tree.update(second_tree)
    finally:
        for pid, t in tree.items():
            if start_time(pid) == t:
                os.kill(pid, signal.SIGKILL)
        for d in drivers + decoys:
            d.kill()
            d.wait()
        shutil.rmtree(tmp, ignore_errors=True)
