"""Scoring generated texts against references with the standard scorers.

- ``exact_match``: fraction of outputs equal to the reference after whitespace normalisation;
- ``rouge_l``: mean ROUGE-L F1 (``rouge-score``, no stemming: the toy words are not English);
- ``bleu``: corpus BLEU (``sacrebleu``) divided by 100, so every metric lies in [0, 1];
- ``final_answer``: exact match of the final answer, the text after the last ``;`` (the whole
  text when there is none), for worked solutions whose steps may differ.
"""
from __future__ import annotations

METRICS = ("exact_match", "rouge_l", "bleu", "final_answer")


def _norm(text: str) -> str:
    return " ".join(text.split())


def score(metric: str, predictions: list[str], references: list[str]) -> float:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score")
    if metric == "exact_match":
        return sum(_norm(p) == _norm(r) for p, r in zip(predictions, references)) / len(predictions)
    if metric == "final_answer":
        def answer(text: str) -> str:
            return _norm(text.rsplit(";", 1)[-1])
        return sum(answer(p) == answer(r) for p, r in zip(predictions, references)) / len(predictions)
    if metric == "rouge_l":
        from rouge_score import rouge_scorer
        # The default tokenizer drops non-alphanumerics; toy words are alphanumeric tokens.
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)
    if metric == "bleu":
        import sacrebleu
        return sacrebleu.corpus_bleu(predictions, [references], tokenize="none").score / 100.0
    raise ValueError(f"unknown metric {metric!r}; eval.metric must be one of {list(METRICS)}")
