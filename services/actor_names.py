"""The names the job's actors go by in logs, errors, the status snapshot and metric labels.

A rollout actor or a learner rank is its role and its index, ``student-0``, ``teacher-1``,
``learner-0``; the replay buffer, of which there is one, is plain ``buffer``. Names are built
with ``actor_name`` and read back with ``parse_actor_name``, nowhere else. Here, the lowest
package, so that the driver, the actors' own messages and the status page all agree.
"""
from __future__ import annotations

from typing import Optional

ROLES = ("student", "teacher", "learner", "buffer")  # in the order the status page lists them
BUFFER = "buffer"


def actor_name(role: str, index: Optional[int] = None) -> str:
    """``role``-``index`` ("student-0"), or ``role`` alone for the one actor of its kind."""
    return role if index is None else f"{role}-{index}"


def parse_actor_name(name: str) -> tuple[str, Optional[int]]:
    """(role, index) of a name ``actor_name`` made: ("student", 0), ("buffer", None). Raises
    ValueError for a name it did not make."""
    role, dash, index = name.partition("-")
    if not dash:
        return role, None
    if not index.isdigit():
        raise ValueError(f"not an actor name: {name!r} (role-index, e.g. student-0)")
    return role, int(index)


def actor_role(name: str) -> str:
    """The role a name starts with ("teacher-3" -> "teacher"), whatever follows it."""
    return name.partition("-")[0]
