"""Part (a): rollout tokens/s of the student, vLLM against transformers ``generate``.

Both engines run in a Ray actor of one CPU with the rollout actors' environment and thread
count (``cluster.actors.actor_env``), one after the other, never at the same time:
- vLLM: the job's own student rollout actor (``rollout.worker.RolloutWorker`` over
  ``rollout/vllm_engine.py``), one ``sample`` request with every prompt; its time is the
  actor's own ``busy_seconds`` around the request (the engine's ``generate``, as the job counts it).
- transformers: ``HFGenerate`` below, one batched ``model.generate`` call (left padding, KV
  cache) over the same prompts; its time is the call itself.

Same prompts, same batch (all of them in one call), same sampling: the job's temperature (1) over the
whole vocabulary (no top-k / top-p), at most ``max_tokens`` new tokens, and a *stop set* of token ids
(every ``stop_every``-th id) that ends a response like an EOS. A random model samples nearly
uniformly, so each token stops the response with probability ~1/``stop_every``: lengths vary per
prompt (geometric, capped at ``max_tokens``), as real responses do. Tokens counted: response
tokens up to and including the stop token. vLLM also returns each token's log-prob (the job
needs it); transformers is not asked to, which can only favour it. One untimed warm-up call
each, then ``repeats`` timed calls, alternating; the median is reported.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import ray


class HFGenerate:
    """A Ray actor: one transformers model sampling with batched ``generate``."""

    def __init__(self, model_dir: str, dtype: str, threads: int, seed: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def run(self, prompts: list[list[int]], max_tokens: int, temperature: float, stop_ids: list[int],
            pad_id: int) -> dict:
        """Sample one response per prompt in one call; returns tokens, seconds and lengths."""
        import torch

        width = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                      top_k=0, top_p=1.0, max_new_tokens=max_tokens,
                                      eos_token_id=list(stop_ids), pad_token_id=pad_id)
        seconds = time.perf_counter() - t0
        stops = set(stop_ids)
        lengths = [_length(row.tolist(), stops) for row in out[:, width:]]
        return {"tokens": sum(lengths), "seconds": seconds, "lengths": lengths}


def _length(tokens: list[int], stops: set[int]) -> int:
    """Response length: up to and including the first stop token."""
    return next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))


def _vllm_counters(worker: Any) -> tuple[int, float]:
    """Inside the rollout actor (``__ray_call__``): its token and busy-time counters."""
    return worker.tokens_out, worker.busy_seconds


def _vllm_run(actor: Any, prompts: list[list[int]], timeout: float) -> dict:
    tokens0, busy0 = ray.get(actor.__ray_call__.remote(_vllm_counters), timeout=timeout)
    samples = ray.get(actor.sample.remote(list(enumerate(prompts))), timeout=timeout)
    tokens1, busy1 = ray.get(actor.__ray_call__.remote(_vllm_counters), timeout=timeout)
    return {"tokens": tokens1 - tokens0, "seconds": busy1 - busy0,
            "lengths": [len(g.response_ids) for g in samples.generations]}


def _summary(runs: list[dict]) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    lengths = [n for r in runs for n in r["lengths"]]
    return {"tokens_per_s": statistics.median(rates), "runs_tokens_per_s": [round(x, 1) for x in rates],
            "runs_seconds": [round(r["seconds"], 3) for r in runs], "runs_tokens": [r["tokens"] for r in runs],
            "mean_response_tokens": round(statistics.mean(lengths), 2)}


def measure_rollout(cfg: Any, pair: Any, prompts: list[list[int]], *, max_tokens: int, stop_every: int,
                    repeats: int, log: Callable[[str], None] = print) -> dict:
    """Part (a) on the student of ``cfg``; returns both engines' tokens/s and their ratio."""
    from cluster.actors import actor_env, rollout_factory, wait_started
    from cluster.config import build_config

    stop_ids = list(range(len(pair.tokenizer.all_special_ids), pair.vocab_size, stop_every))
    cfg = build_config(cfg.model_dump(), [f"data.max_response_tokens={max_tokens}"])
    pair = dataclasses.replace(pair, stop_token_ids=stop_ids,
                               max_model_len=cfg.data.max_prompt_tokens + max_tokens)
    timeout, threads = cfg.ray.actor_timeout_s, cfg.rollout.threads
    vllm = rollout_factory(cfg, pair)("student", 0)
    hf = ray.remote(HFGenerate).options(num_cpus=1, runtime_env=actor_env(threads)).remote(
        cfg.models.student, cfg.rollout.dtype, threads, cfg.seed)
    wait_started([vllm], "the vLLM student actor", timeout)
    try:
        runs: dict[str, list[dict]] = {"vllm": [], "hf_generate": []}
        for i in range(repeats + 1):  # the first call of each is a warm-up
            v = _vllm_run(vllm, prompts, timeout)
            h = ray.get(hf.run.remote(prompts, max_tokens, cfg.rollout.temperature, stop_ids, pair.pad_id),
                        timeout=timeout)
            if i:
                runs["vllm"].append(v), runs["hf_generate"].append(h)
                log(f"(a) run {i}: vLLM {v['tokens'] / v['seconds']:.0f} tok/s, "
                    f"transformers generate {h['tokens'] / h['seconds']:.0f} tok/s")
    finally:
        ray.kill(vllm), ray.kill(hf)
    result = {name: _summary(r) for name, r in runs.items()}
    ratio = result["vllm"]["tokens_per_s"] / result["hf_generate"]["tokens_per_s"]
    return {**result, "ratio": ratio, "target": 1.3, "met": ratio >= 1.3, "prompts": len(prompts),
            "max_tokens": max_tokens, "stop_ids": len(stop_ids), "stop_every": stop_every,
            "repeats": repeats, "threads": threads, "dtype": cfg.rollout.dtype}
