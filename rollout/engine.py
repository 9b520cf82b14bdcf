"""The engine interface every rollout backend implements, and the registry that picks one.

An engine owns one model and does three things:
- ``generate(prompts, sampling)``: sample a response per prompt, keeping each sampled
  token's log-prob under the sampling policy (the behaviour policy), and, when
  ``sampling.topk > 0``, the top-k log-probs of the model's own distribution per position;
- ``score(prompts, responses, top_k)``: the model's top-k log-probs at every response position
  of given sequences (teacher scoring of student samples);
- ``load_weights(named_tensors, version)``: replace the weights in place (no restart).

Engines take and return token ids only; tokenisation belongs to the driver. An engine is built
by name, ``make_engine(name, model_dir, options)``, from one frozen ``EngineOptions``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol

import numpy as np
import torch

from learner.constants import TAIL_LOG_FLOOR

# Floor for the stored tail log-mass: the mass outside the top-k can be exactly zero (k = V)
# or slightly negative through rounding; a finite floor keeps every loss free of inf - inf.
# The losses' own floor, so the two cannot drift apart.
MIN_TAIL_LOGMASS = TAIL_LOG_FLOOR  # log(1e-30)


@dataclass
class SamplingConfig:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    topk: int = 0  # keep the top-k log-probs of each generated position (0 = none)
    stop_token_ids: tuple[int, ...] = ()
    # Sample only ids below this (None = any): set when the two models' output layers are padded
    # to different widths, so neither emits a padding id the other has no embedding for.
    token_limit: Optional[int] = None


@dataclass(frozen=True)
class EngineOptions:
    """How an engine is started (``cluster.actors.engine_options`` fills it from the job config).
    Each engine reads the fields it has a use for; the rest keep these defaults."""

    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"                             # hf: where the model runs
    kv_cache_mib: Optional[int] = 256               # vllm: a fixed KV cache (None: sized by the share)
    gpu_memory_utilization: Optional[float] = None  # vllm on GPU: the share it sizes the KV cache by
    tensor_parallel_size: int = 1                   # vllm
    eager: bool = True                              # vllm: no CUDA graphs
    max_model_len: int = 256                        # vllm
    max_logprobs: int = 20                          # vllm
    logprobs_mode: str = "raw_logprobs"             # vllm: "processed_logprobs" = after temperature


@dataclass
class Generation:
    """One sampled response. Arrays are numpy; topk_* are [len(response_ids), k] or None."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    topk_ids: Optional[np.ndarray] = None
    topk_logprobs: Optional[np.ndarray] = None


@dataclass
class Scores:
    """Top-k log-probs of the scoring model at each response position: [R, k] each."""

    topk_ids: np.ndarray
    topk_logprobs: np.ndarray


class Engine(Protocol):
    version: int

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]: ...

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scores]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def health(self) -> dict[str, Any]: ...


def tail_logmass(topk_logprobs: np.ndarray) -> np.ndarray:
    """log(1 - sum_k exp(lp)) per position, floored at MIN_TAIL_LOGMASS."""
    if topk_logprobs.shape[0] == 0:
        return np.zeros(0, np.float32)
    lp = topk_logprobs.astype(np.float64)
    m = lp.max(axis=-1, keepdims=True)
    lse = (m + np.log(np.exp(lp - m).sum(axis=-1, keepdims=True)))[..., 0]
    mass = -np.expm1(np.minimum(lse, 0.0))
    with np.errstate(divide="ignore"):
        out = np.log(mass)
    return np.maximum(out, MIN_TAIL_LOGMASS).astype(np.float32)


_ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str) -> Callable:
    def deco(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        _ENGINES[name] = factory
        return factory
    return deco


def make_engine(name: str, model_dir: str, options: EngineOptions = EngineOptions()) -> Engine:
    """Build an engine by registry name ('vllm' or 'hf'); imports the backend lazily."""
    if name == "vllm":
        import rollout.vllm_engine  # noqa: F401  (registers itself)
    elif name == "hf":
        import rollout.hf_engine  # noqa: F401
    if name not in _ENGINES:
        raise ValueError(f"rollout.engine: unknown engine {name!r}; choose one of ['vllm', 'hf']")
    return _ENGINES[name](model_dir, options)
