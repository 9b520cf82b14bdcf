"""Translate-like: a synthetic language pair with reordering and synonyms. Scored by BLEU.

Source clauses are ``det [adj] noun verb det [adj] noun`` (each adjective optional); the target
maps word by word through a fixed lexicon, puts adjectives after their noun and the verb last
(``D N [A] D N [A] V``), and two clauses joined by ``and`` come out in reverse order, so every
word moves by an amount that depends on the sentence. Some adjectives have a second target
synonym: training references use it one time in four, so the teacher learns a distribution
over valid translations; held-out references use the main word.
"""
from __future__ import annotations

import random

from tasks.base import Example, Task, register


@register
class TranslateTask(Task):
    name = "translate"
    metric = "bleu"
    nouns, adjs, verbs, dets = 12, 8, 8, 2
    synonym_rate = 0.25

    def words(self) -> list[str]:
        src = [f"n{i}" for i in range(self.nouns)] + [f"a{i}" for i in range(self.adjs)] + \
              [f"v{i}" for i in range(self.verbs)] + [f"d{i}" for i in range(self.dets)]
        tgt = [w.upper() for w in src] + [f"B{i}" for i in range(self.adjs)]
        return ["translate", "=", "and", "AND"] + src + tgt

    def _noun_phrase(self, rng: random.Random, train: bool) -> tuple[list[str], list[str]]:
        d, n = f"d{rng.randrange(self.dets)}", f"n{rng.randrange(self.nouns)}"
        if rng.random() < 0.5:
            return [d, n], [d.upper(), n.upper()]
        a = rng.randrange(self.adjs)
        adj_t = f"B{a}" if train and a % 2 == 0 and rng.random() < self.synonym_rate else f"A{a}"
        return [d, f"a{a}", n], [d.upper(), n.upper(), adj_t]

    def _clause(self, rng: random.Random, train: bool) -> tuple[list[str], list[str]]:
        (s1, t1), (s2, t2) = self._noun_phrase(rng, train), self._noun_phrase(rng, train)
        v = f"v{rng.randrange(self.verbs)}"
        return s1 + [v] + s2, t1 + t2 + [v.upper()]

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        src, tgt = self._clause(rng, train)
        if rng.random() < 0.6:
            s2, t2 = self._clause(rng, train)
            src, tgt = src + ["and"] + s2, t2 + ["AND"] + tgt
        return Example("translate " + " ".join(src) + " =", " ".join(tgt))
