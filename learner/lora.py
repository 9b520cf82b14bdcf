"""LoRA students (PEFT): the wrapped model in the learner, the plain model everywhere else.

With ``learner.lora`` set, each learner rank wraps the student with PEFT's LoRA before
``deepspeed.initialize`` (``wrap_student``): every targeted linear layer y = W x keeps its
weight W (out x in) frozen and learns two small matrices A (r x in) and B (out x r), so that

    y = W x + s * B (A x),    s = alpha / r,

B starting at zero (the wrapped model starts as the base model). Only A and B are trainable,
and only they reach the optimiser (``trainable_parameters``).

Everything outside the learner (vLLM's ``reload_weights``, the exported student, transformers)
sees the plain Hugging Face model: the same parameter names as the base model and, for each
targeted layer, the merged weight

    W' = W + s * B @ A,

which gives the wrapped layer's outputs exactly (dropout is off at inference). That view is
``student_pieces`` + ``materialise``: each output tensor (a ``Piece``) names the parameters it
is computed from, (W,) for an untouched one and (W, A, B) for a merged one, so a ZeRO-3
gather can fetch a bucket's pieces together with their adapters and no rank ever holds a merged
copy of the whole model. For a model without adapters every piece is its own single parameter
under its own name: the identity, one code path for both kinds of student.

PEFT's names, which this maps back (``hf_name``):
  base_model.model.<hf path>.base_layer.weight       -> <hf path>.weight  (merged with the two below)
  base_model.model.<hf path>.lora_A.<adapter>.weight -> (folded into <hf path>.weight)
  base_model.model.<hf path>.lora_B.<adapter>.weight -> (folded into <hf path>.weight)
  base_model.model.<anything else>                   -> <anything else>
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Optional, Union

import torch

PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's names
BASE_LAYER = ".base_layer."        # a targeted layer's own (frozen) parameters sit under it
ADAPTER_MARKERS = (".lora_A.", ".lora_B.")
ADAPTER_DIR = "adapter"            # the adapter beside the merged student (write_student_dir)


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """What a learner rank takes from ``learner.lora`` (``cluster.config.LoraConfig``)."""

    r: int
    alpha: float
    dropout: float
    target_modules: Union[str, tuple[str, ...]]  # "all-linear" or module names (q_proj, ...)

    @property
    def scale(self) -> float:
        """s = alpha / r: the factor of B @ A in the merged weight."""
        return self.alpha / self.r

    @classmethod
    def of(cls, section: Any) -> Optional["LoraSettings"]:
        """The settings of a config section (any object with these attributes, or a dict);
        None stays None (full fine-tuning)."""
        if section is None:
            return None
        get = section.get if isinstance(section, Mapping) else lambda k: getattr(section, k)
        targets = get("target_modules")
        return cls(int(get("r")), float(get("alpha")), float(get("dropout")),
                   targets if isinstance(targets, str) else tuple(targets))

    def peft_config(self) -> Any:
        """PEFT's ``LoraConfig`` for a causal LM with these settings."""
        from peft import LoraConfig

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")


def wrap_student(model: torch.nn.Module, lora: Optional[LoraSettings]) -> torch.nn.Module:
    """The student as the learner trains it: ``model`` itself without LoRA, else PEFT's wrapper
    around it (the base weights frozen, A and B trainable). Raises ValueError when a targeted
    layer is one whose merge ``materialise`` cannot express (not an ``nn.Linear``, or the output
    head of a tied model, which would untie it)."""
    if lora is None:
        return model
    from peft import get_peft_model

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    wrapped = get_peft_model(model, lora.peft_config())
    for name, module in wrapped.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        if type(module.base_layer) is not torch.nn.Linear or getattr(module, "fan_in_fan_out", False):
            kind = type(module.base_layer).__name__
            raise ValueError(f"learner.lora.target_modules: {hf_name(name)} is a {kind}; "
                             "only linear layers can be merged for the weight push, so leave it out")
        if tied and module.base_layer is head:
            raise ValueError(f"learner.lora.target_modules: {hf_name(name)} is the output head, tied to "
                             f"the input embedding; an adapter on it would untie them, so leave it out")
    # With gradient checkpointing the frozen embedding's output would need no gradient, and a
    # checkpointed block whose inputs need none gets none back: its adapters would never learn.
    wrapped.enable_input_require_grads()
    return wrapped


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimiser steps: all of a plain student, A and B of a LoRA one."""
    return [p for p in model.parameters() if p.requires_grad]


def hf_name(name: str) -> str:
    """A parameter's name in the plain Hugging Face model (the identity for a plain model)."""
    name = name.removeprefix(PEFT_PREFIX)
    return name.replace(BASE_LAYER, ".")


def is_adapter(name: str) -> bool:
    """Whether ``name`` is one of LoRA's A or B (never pushed or exported as itself)."""
    return any(marker in name for marker in ADAPTER_MARKERS)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One tensor of the student as vLLM sees it: its HF name and the parameters (by their names
    in the trained module) it is computed from: (W,), or (W, A, B) for a merged weight."""

    name: str
    sources: tuple[str, ...]


def student_pieces(names: Iterable[str]) -> list[Piece]:
    """The tensors of the plain model, in the order of ``names`` (a module's parameter names).

    Raises ValueError when a base layer's weight has no A and B, or more than one adapter: the
    merge would be ambiguous (ammd trains one adapter, ``default``).
    """
    names = list(names)
    adapters: dict[str, dict[str, list[str]]] = {}
    for n in names:
        for marker in ADAPTER_MARKERS:
            if marker in n:
                owner = n.split(marker)[0]
                adapters.setdefault(owner, {}).setdefault(marker, []).append(n)
    pieces = []
    for n in names:
        if is_adapter(n):
            continue
        owner = n.removesuffix(f"{BASE_LAYER}weight") if n.endswith(f"{BASE_LAYER}weight") else None
        if owner is None:
            pieces.append(Piece(hf_name(n), (n,)))
            continue
        found = adapters.get(owner, {})
        a, b = found.get(ADAPTER_MARKERS[0], []), found.get(ADAPTER_MARKERS[1], [])
        if len(a) != 1 or len(b) != 1:
            raise ValueError(f"{n}: expected one lora_A and one lora_B beside it, found {a + b}")
        pieces.append(Piece(hf_name(n), (n, a[0], b[0])))
    return pieces


def materialise(piece: Piece, tensors: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """The piece's tensor: its one source as it is, or W + scale * B @ A, computed in at least
    float32 (a bf16 W would otherwise round the small update away) and returned in that dtype;
    the caller casts to the push or export dtype."""
    if len(piece.sources) == 1:
        return tensors[piece.sources[0]]
    w, a, b = (tensors[s] for s in piece.sources)
    dtype = torch.promote_types(w.dtype, torch.float32)
    # In place on the one new tensor, B @ A: a merged weight costs one allocation, not three.
    return (b.to(dtype) @ a.to(dtype)).mul_(scale).add_(w)


def merged_named_tensors(named: Mapping[str, torch.Tensor], scale: float) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the plain model from the trained module's (name, tensor) mapping,
    e.g. a state dict: every merged weight W + scale * B @ A, every other tensor as it is."""
    for piece in student_pieces(named):
        yield piece.name, materialise(piece, named, scale)


def adapter_skeleton(config_dir: str | Path, lora: LoraSettings) -> torch.nn.Module:
    """The wrapped student of ``config_dir``'s config on the meta device (no memory, no
    weights): what PEFT's ``save_pretrained`` needs besides the adapter's tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir))
    return wrap_student(base, lora)


def save_adapter(wrapped: torch.nn.Module, state: Mapping[str, torch.Tensor], out_dir: str | Path,
                 base_dir: str | Path) -> None:
    """Write the adapter with PEFT's ``save_pretrained`` (adapter_config.json and
    adapter_model.safetensors, loadable with ``PeftModel.from_pretrained(base, out_dir)``).

    ``state``: A and B under the wrapped module's names (gathered, on CPU); it is what is
    written, not the module's own tensors, which under ZeRO-3 are partitions. ``base_dir``: the
    base student the adapter applies to, recorded as ``base_model_name_or_path``.
    """
    for config in wrapped.peft_config.values():
        config.base_model_name_or_path = str(base_dir)
    # save_embedding_layers=False: no embedding is targeted (wrap_student), and "auto" may look
    # the base model up on the hub.
    wrapped.save_pretrained(str(out_dir), state_dict=dict(state), save_embedding_layers=False)
