"""Scoring a rollout actor's greedy answers on held-out prompts with the task's metric."""
from __future__ import annotations

from typing import Any

import ray

from cluster.data import Prompt


def greedy_score(actor: Any, prompts: list[Prompt], tokenizer: Any, metric: str,
                 timeout: float | None = None) -> dict[str, Any]:
    """Greedy-decode ``prompts`` on ``actor`` and score against their references (waiting at
    most ``timeout`` seconds: ray.exceptions.GetTimeoutError past it)."""
    from tasks.scoring import score

    refs = [p.reference for p in prompts]
    if any(r is None for r in refs):
        raise ValueError("evaluation prompts need a 'response' (the reference) in every row")
    outputs = ray.get(actor.greedy.remote([p.ids for p in prompts]), timeout=timeout)
    texts = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs]
    return {"score": score(metric, texts, refs), "examples": [
        {"prompt": p.text, "reference": p.reference, "output": t} for p, t in zip(prompts[:5], texts)]}
