"""The one answer every long-lived actor gives to ``ping``: who and where it is, right now.

The supervisor times these answers for ``/status`` (``last_seen_s``, ``pid``), and placement
reads where each actor runs from them. One function, so the rollout actors, the learner ranks
and the replay buffer cannot drift apart in what a ping means.
"""
from __future__ import annotations

import os
import time
from typing import Any


def ping_answer() -> dict[str, Any]:
    """``{"pid", "time", "node_id", "node_ip"}`` of the calling process (node fields are None
    outside a Ray worker, e.g. a buffer under unit test)."""
    import ray

    inside = ray.is_initialized()
    return {"pid": os.getpid(), "time": time.time(),
            "node_id": ray.get_runtime_context().get_node_id() if inside else None,
            "node_ip": ray.util.get_node_ip_address() if inside else None}
