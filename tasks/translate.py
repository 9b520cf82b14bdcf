"""Translate-like: a synthetic language pair with reordering and synonyms. Scored by BLEU.

Source clauses are ``det adj noun verb det noun``; the target puts adjectives after their noun
and the verb last (``D N A D N V``), word by word through a fixed lexicon, and may join two
clauses with ``and``. Some adjectives have a second target synonym: the training references
use it one time in four, so the teacher learns a distribution over valid translations;
held-out references use the main word.
"""
from __future__ import annotations

import random

from tasks.base import Example, Task, register


@register
class TranslateTask(Task):
    name = "translate"
    metric = "bleu"
    nouns, adjs, verbs, dets = 8, 6, 6, 2
    synonym_rate = 0.25

    def words(self) -> list[str]:
        src = [f"n{i}" for i in range(self.nouns)] + [f"a{i}" for i in range(self.adjs)] + \
              [f"v{i}" for i in range(self.verbs)] + [f"d{i}" for i in range(self.dets)]
        tgt = [w.upper() for w in src] + [f"B{i}" for i in range(self.adjs)]
        return ["translate", "=", "and", "AND"] + src + tgt

    def _clause(self, rng: random.Random, train: bool) -> tuple[list[str], list[str]]:
        d1, d2 = (f"d{rng.randrange(self.dets)}" for _ in range(2))
        a, v = rng.randrange(self.adjs), f"v{rng.randrange(self.verbs)}"
        n1, n2 = (f"n{rng.randrange(self.nouns)}" for _ in range(2))
        adj_t = f"B{a}" if train and a % 2 == 0 and rng.random() < self.synonym_rate else f"A{a}"
        return [d1, f"a{a}", n1, v, d2, n2], [d1.upper(), n1.upper(), adj_t, d2.upper(), n2.upper(), v.upper()]

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        src, tgt = self._clause(rng, train)
        if rng.random() < 0.5:
            s2, t2 = self._clause(rng, train)
            src, tgt = src + ["and"] + s2, tgt + ["AND"] + t2
        return Example("translate " + " ".join(src) + " =", " ".join(tgt))
