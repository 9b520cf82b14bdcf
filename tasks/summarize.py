"""Summarise-like: keep the content words a document repeats. Scored by ROUGE-L.

``summarize c3 f1 c7 c3 f0 c2 c7 f4 =`` -> ``c3 c7``: the content words (``c*``) that occur at
least twice, in order of first appearance; filler words (``f*``) never appear in a summary.
The training references carry real ambiguity, as human summaries do: one in four lists the
same words in order of frequency instead (ties by first appearance), so a teacher's
distribution says more than one reference does. Held-out references use the first order.
"""
from __future__ import annotations

import random
from collections import Counter

from tasks.base import Example, Task, register


@register
class SummarizeTask(Task):
    name = "summarize"
    metric = "rouge_l"
    content, filler = 12, 8
    min_len, max_len = 8, 14
    alternative_order = 0.25

    def words(self) -> list[str]:
        return ["summarize", "="] + [f"c{i}" for i in range(self.content)] + [f"f{i}" for i in range(self.filler)]

    def _document(self, rng: random.Random) -> list[str]:
        keep = rng.sample(range(self.content), rng.randint(1, 4))  # words likely to repeat
        doc = []
        for _ in range(rng.randint(self.min_len, self.max_len)):
            r = rng.random()
            doc.append(f"c{rng.choice(keep)}" if r < 0.5 else
                       f"c{rng.randrange(self.content)}" if r < 0.7 else f"f{rng.randrange(self.filler)}")
        return doc

    def summary(self, doc: list[str], by_frequency: bool = False) -> list[str]:
        counts = Counter(w for w in doc if w.startswith("c"))
        first = {w: i for i, w in reversed(list(enumerate(doc)))}
        kept = [w for w in counts if counts[w] >= 2]
        key = (lambda w: (-counts[w], first[w])) if by_frequency else (lambda w: first[w])
        return sorted(kept, key=key)

    def sample(self, rng: random.Random, train: bool = False) -> Example:
        doc = self._document(rng)
        while not self.summary(doc):
            doc = self._document(rng)
        alt = train and rng.random() < self.alternative_order
        return Example("summarize " + " ".join(doc) + " =", " ".join(self.summary(doc, by_frequency=alt)))
