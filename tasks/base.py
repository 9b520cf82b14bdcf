"""A synthetic task: a seeded generator of (prompt, response) pairs, its words and its metric.

Tasks are registered by name; ``models.toy_task`` in the config picks one. A task only has to
say which words it uses (the tokenizer is built from them), how to draw one example from a
``random.Random`` and which metric scores it (``tasks.scoring``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


class Task:
    name: str = ""
    metric: str = "exact_match"

    def words(self) -> list[str]:
        """Every word a prompt or response may contain (the tokenizer's non-special vocabulary)."""
        raise NotImplementedError

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        """One example; ``train`` may draw among several valid references (held-out: canonical)."""
        raise NotImplementedError

    def splits(self, seed: int, n_train: int, n_eval: int, n_test: int) -> dict[str, list[Example]]:
        """Deterministic train / eval / test splits; held-out prompts never appear in train."""
        rng = random.Random(seed)
        held: dict[str, Example] = {}
        while len(held) < n_eval + n_test:
            ex = self.sample(rng, train=False)
            held.setdefault(ex.prompt, ex)
        held_list = list(held.values())
        train = []
        while len(train) < n_train:
            ex = self.sample(rng, train=True)
            if ex.prompt not in held:
                train.append(ex)
        return {"train": train, "eval": held_list[:n_eval], "test": held_list[n_eval:]}


_TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    _register_all()
    if name not in _TASKS:
        raise ValueError(f"unknown toy task {name!r}; models.toy_task must be one of {sorted(_TASKS)}")
    return _TASKS[name]()


def task_names() -> list[str]:
    _register_all()
    return sorted(_TASKS)


def _register_all() -> None:
    # Importing the modules registers their tasks.
    from tasks import arith, sorting, summarize, translate  # noqa: F401
