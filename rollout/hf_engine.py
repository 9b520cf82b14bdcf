"""The reference engine: plain transformers, one prompt at a time, no batching tricks.

It exists to check the product engine (parity tests compare the two on the same weights) and
to run where vLLM is not installed. It is slow by design: every number is a direct forward.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from rollout.engine import EngineOptions, Generation, SamplingConfig, Scores, register_engine


@register_engine("hf")
class HFEngine:
    def __init__(self, model_dir: str, options: EngineOptions = EngineOptions()):
        """Reads ``options.seed``, ``dtype`` and ``device``; the vLLM-only fields do not apply."""
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        self.version = 0
        self.device = torch.device(options.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, options.dtype))
        self.model.to(self.device).eval()
        self.generator = torch.Generator(device="cpu").manual_seed(options.seed)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log_softmax of the logits at every position of ``ids``: [len(ids), V] (float32)."""
        x = torch.tensor([ids], device=self.device)
        return torch.log_softmax(self.model(x).logits[0].float(), dim=-1).cpu()

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        return [self._generate_one(list(map(int, p)), sampling) for p in prompts]

    def _generate_one(self, prompt: list[int], sampling: SamplingConfig) -> Generation:
        seq, sampled, top_ids, top_lps = list(prompt), [], [], []
        finish = "length"
        for _ in range(sampling.max_tokens):
            raw = self._logprobs(seq)[-1]
            if sampling.token_limit is not None:  # renormalised over the allowed ids, as vLLM does
                raw = torch.log_softmax(raw[:sampling.token_limit], dim=-1)
            if sampling.temperature == 0:
                tok = int(raw.argmax())
                policy = raw
            else:
                policy = torch.log_softmax(raw / sampling.temperature, dim=-1)
                tok = int(torch.multinomial(policy.exp(), 1, generator=self.generator))
            sampled.append(float(policy[tok]))
            if sampling.topk:
                v, i = raw.topk(sampling.topk)
                top_ids.append(i.numpy()), top_lps.append(v.numpy())
            seq.append(tok)
            if tok in sampling.stop_token_ids:
                finish = "stop"
                break
        k = sampling.topk
        return Generation(
            np.asarray(prompt, np.int32), np.asarray(seq[len(prompt):], np.int32),
            np.asarray(sampled, np.float32), finish,
            np.asarray(top_ids, np.int32).reshape(-1, k) if k else None,
            np.asarray(top_lps, np.float32).reshape(-1, k) if k else None,
        )

    def score(self, prompts: list[list[int]], responses: list[list[int]], top_k: int) -> list[Scores]:
        result = []
        for prompt, response in zip(prompts, responses):
            lp = self._logprobs(list(prompt) + list(response))
            # Logits at position i predict token i + 1.
            rows = lp[len(prompt) - 1: len(prompt) - 1 + len(response)]
            v, i = rows.topk(top_k, dim=-1)
            result.append(Scores(i.numpy().astype(np.int32), v.numpy().astype(np.float32)))
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        state = dict(named_tensors)
        missing = set(self.model.state_dict()) - set(state)
        if missing:
            raise ValueError(f"weight push is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        self.model.load_state_dict(state, strict=True)
        self.version = version

    def health(self) -> dict[str, Any]:
        return {"engine": "hf", "model": self.model_dir, "version": self.version}
