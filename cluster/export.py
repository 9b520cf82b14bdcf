"""``ammd export``: a checkpoint's student as a Hugging Face model directory.

The checkpoint is verified against its checksums (cluster.checkpoint.verify) before any file
of it is read. The weights come from the checkpoint's DeepSpeed state itself (every rank's ZeRO shards,
merged by DeepSpeed's own ``zero_to_fp32`` reader), not from the export saved beside it, so
the command also converts a checkpoint whose ``student/`` was deleted or damaged. Config and
tokenizer files come from the checkpoint's ``student/`` when present, else from the student
model the job was started with. A LoRA job's checkpoint (``learner.lora``) holds the base
weights and the adapters under PEFT's names: the export is the merged plain model
(``learner.lora.merged_named_tensors``) plus the adapter in ``adapter/``, as the job writes them.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Optional

from cluster import checkpoint
from cluster.checkpoint import CheckpointError
from cluster.errors import first_line


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, given it or a run directory (its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: give a run directory (runs/<name>) or one of "
                              f"its checkpoints (runs/<name>/checkpoints/step-...)")
    if (path / checkpoint.DRIVER_STATE).is_file():
        checkpoint.verify(path)
        return path
    found = checkpoint.latest(checkpoint.checkpoints_root(path))
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no {checkpoint.DRIVER_STATE}, and "
                              f"no checkpoints/latest pointing at one); give the run directory of a job "
                              f"that saved one (learner.save_every) or one of its checkpoints/step-... dirs")
    checkpoint.verify(found)  # before DeepSpeed's reader unpickles anything of it
    return found


def _check_out(out: Path) -> None:
    """``--out`` is replaced whole: refuse a file, or a directory that is not a model directory."""
    if out.is_file():
        raise CheckpointError(f"--out {out} is a file; give a directory for the model (new, empty or "
                              f"an earlier export)")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise CheckpointError(f"--out {out} is a directory that holds other files and no model "
                              f"(no config.json); it would be replaced whole, so give a new or "
                              f"empty directory, or an earlier export")


def _state_dict(ckpt: Path, zero_stage: int) -> dict:
    """The trained module's state: the whole module under ZeRO 0; under ZeRO 1/2 the module
    with DeepSpeed's fp32 master copies of the trained parameters over it (its reader leaves
    out frozen ones there: a LoRA student's base weights); under ZeRO 3 the merged shards,
    frozen parameters included."""
    from learner.learner_actor import CHECKPOINT_TAG

    root = ckpt / "deepspeed"
    if not (root / CHECKPOINT_TAG).is_dir():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: it has no DeepSpeed state under "
                              f"{root / CHECKPOINT_TAG}; export another checkpoint of the run "
                              f"(runs/<name>/checkpoints/step-...)")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if zero_stage == 3:
        return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=CHECKPOINT_TAG)
    module = _module_states(ckpt, root / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    if zero_stage == 0:
        return module
    return {**module, **get_fp32_state_dict_from_zero_checkpoint(str(root), tag=CHECKPOINT_TAG)}


def _module_states(ckpt: Path, path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)["module"]
    except pickle.UnpicklingError as err:  # weights_only refused an object: never run it
        raise CheckpointError(f"checkpoint {ckpt}: {path} holds not only tensors and plain values "
                              f"({first_line(err, 120)}); it is not loaded (a checkpoint is code to "
                              f"whoever can write it)") from None


def _adapter_writer(state: dict, lora, source: Path, base: str) -> Optional[Callable[[Path], None]]:
    """What writes a LoRA checkpoint's adapter (None for a plain student): its A and B through a
    meta-device copy of the wrapped student, as PEFT's save_pretrained needs one."""
    from learner.lora import adapter_skeleton, is_adapter, save_adapter

    adapter = {n: t for n, t in state.items() if is_adapter(n)}
    if not adapter:
        return None
    return lambda out: save_adapter(adapter_skeleton(source, lora), adapter, out, base)


def export_checkpoint(path: str | Path, out: str | Path, dtype: Optional[str] = None) -> Path:
    """Write the student of checkpoint (or run) ``path`` to ``out``; returns ``out``."""
    import json

    import torch

    from learner.lora import LoraSettings, is_adapter, merged_named_tensors
    from learner.student_dir import write_student_dir

    ckpt = resolve_checkpoint(path)
    _check_out(Path(out))
    config = checkpoint.load_state(ckpt).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {ckpt} is damaged: its {checkpoint.DRIVER_STATE} holds no "
                              f"config; export another checkpoint of the run")
    source = ckpt / "student" if (ckpt / "student" / "config.json").is_file() else Path(config["models"]["student"])
    if not (source / "config.json").is_file():
        raise CheckpointError(f"no model config for the student: neither {ckpt / 'student'} nor {source} "
                              f"has a config.json")
    state = _state_dict(ckpt, config["learner"]["zero_stage"])
    lora = LoraSettings.of(config["learner"].get("lora"))  # absent in checkpoints before LoRA: None
    if lora is None and any(is_adapter(n) for n in state):
        raise CheckpointError(f"checkpoint {ckpt} holds LoRA adapters but its config has no learner.lora "
                              f"(their alpha / r is unknown); export another checkpoint of the run")
    named = dict(merged_named_tensors(state, lora.scale if lora else 0.0))
    if json.loads((source / "config.json").read_text()).get("tie_word_embeddings"):
        named.pop("lm_head.weight", None)  # tied: the input embedding is the head, as on load
    target = getattr(torch, dtype or config["rollout"]["dtype"])
    writer = _adapter_writer(state, lora, source, config["models"]["student"])
    return write_student_dir(out, iter([[(n, t.to(target)) for n, t in named.items()]]), source, target, writer)
