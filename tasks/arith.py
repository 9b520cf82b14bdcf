"""Reasoning-like: multi-step arithmetic written out, then the answer. Scored on the answer.

``calc 3 + 4 * 2 =`` -> ``4 * 2 = 8 , 3 + 8 = 11 ; 11``: one step per operation (products
first), then ``;`` and the final answer, which is what ``final_answer`` scores by exact match.
Sums of three numbers may be worked left or right first: the training references pick either
(the teacher learns both valid chains); held-out references work left to right.
"""
from __future__ import annotations

import random

from tasks.base import Example, Task, register


@register
class ArithTask(Task):
    name = "arith"
    metric = "final_answer"

    def words(self) -> list[str]:
        return ["calc", "=", "+", "*", ",", ";"] + [str(v) for v in range(100)]

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        nums = [rng.randint(1, 9) for _ in range(rng.randint(2, 3))]
        ops = [rng.choice("+*") for _ in range(len(nums) - 1)]
        if ops.count("*") > 1:  # at most one product keeps every value below 100
            ops[1] = "+"
        tokens = [str(nums[0])] + [t for o, n in zip(ops, nums[1:]) for t in (o, str(n))]
        prompt = "calc " + " ".join(tokens) + " ="
        steps, values, pending = [], list(nums), list(ops)
        if "*" in pending:  # the product first
            i = pending.index("*")
            product = values[i] * values[i + 1]
            steps.append(f"{values[i]} * {values[i + 1]} = {product}")
            values[i:i + 2], pending[i:i + 1] = [product], []
        if len(values) == 3 and train and rng.random() < 0.5:  # right-first is valid too
            right = values[1] + values[2]
            steps.append(f"{values[1]} + {values[2]} = {right}")
            values = [values[0], right]
        while len(values) > 1:
            total = values[0] + values[1]
            steps.append(f"{values[0]} + {values[1]} = {total}")
            values = [total] + values[2:]
        return Example(prompt, " , ".join(steps) + f" ; {values[0]}")
