"""Sorting: ``sort 5 13 8 1 =`` -> ``1 5 8 13``. One right answer, scored by exact match.

Easy for a two-layer model trained long enough, hard for a one-layer model trained briefly,
so the teacher is clearly better than the student and distillation has room to show.
"""
from __future__ import annotations

import random

from tasks.base import Example, Task, register


@register
class SortTask(Task):
    name = "sort"
    metric = "exact_match"
    max_value = 30
    min_len, max_len = 4, 10

    def words(self) -> list[str]:
        return ["sort", "="] + [str(v) for v in range(self.max_value)]

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        values = [rng.randrange(self.max_value) for _ in range(rng.randint(self.min_len, self.max_len))]
        return Example(prompt="sort " + " ".join(map(str, values)) + " =",
                       response=" ".join(map(str, sorted(values))))
