"""Bounded waits on actors, and the error that a lost actor becomes.

Every wait of the driver on an actor is bounded by ``ray.actor_timeout_s``: an actor that dies
or stops answering fails the job with one message that names it and says how to resume
(``ActorLostError``). This module sits below the rest of the driver (it imports nothing of
``cluster`` but ``cluster.errors``), so the trainer, the weight push and the supervisor all use
it without an import cycle.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from cluster.errors import first_line


class ActorLostError(RuntimeError):
    """An actor died or stopped answering and the job cannot go on without it."""


def _no_hint() -> str:
    return ""


@dataclass
class Waiter:
    """``ray.get`` bounded by ``timeout_s``; ``how_to_resume()`` ends every failure's message."""

    timeout_s: float
    how_to_resume: Callable[[], str] = _no_hint

    def wait(self, refs: Any, who: str | list[str]) -> Any:
        """The results of ``refs`` (one ref or a list), or ``ActorLostError`` naming the actor.

        ``who`` names the actor (or one per ref). The first failure raises at once: a rank that
        died must not leave the driver waiting on the ranks stuck in a collective with it. Every
        ref still pending when ``timeout_s`` has passed is named as silent.
        """
        many = isinstance(refs, list)
        names = who if isinstance(who, list) else [who] * (len(refs) if many else 1)
        pending = list(refs) if many else [refs]
        index = {ref: i for i, ref in enumerate(pending)}
        deadline = time.time() + self.timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.time()))
            if not done:
                silent = sorted({names[index[r]] for r in pending})
                raise ActorLostError(f"{', '.join(silent)} did not answer within ray.actor_timeout_s="
                                     f"{self.timeout_s:.0f} s. {self.how_to_resume()}")
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                raise ActorLostError(f"{names[index[done[0]]]} died ({first_line(err)}). "
                                     f"{self.how_to_resume()}") from None
        return ray.get(refs)
