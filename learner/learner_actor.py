"""A learner rank: one member of the torch.distributed group that runs one DeepSpeed engine.

N of these run as Ray actors. Each is told its rank, the world size and rank 0's address; they
form one group (gloo on CPU, NCCL on GPU) and DeepSpeed shards optimiser state (ZeRO 1/2) or
parameters too (ZeRO 3) across it. Every call that touches the group (``train_step``,
``export_weights``, ``export_student``, ``save``, ``load``) must be made on all ranks at once; the driver does that.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any, Optional

import pyarrow as pa
import ray

from learner.lora import LoraSettings
from services.actor_names import actor_name
from services.liveness import ping_answer

CHECKPOINT_TAG = "state"  # one DeepSpeed tag per checkpoint directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """This node's IP and a free port: the rendezvous that rank 0 offers the others."""
    import ray
    return ray.util.get_node_ip_address(), free_port()


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
    """What a learner rank takes from the job's ``learner`` section (``cluster.config.LearnerConfig``)."""

    device: str                  # "cpu" or "cuda"
    precision: str               # "fp32" or "bf16"
    zero_stage: int
    micro_batch: int             # rows per rank per step
    grad_clip: float
    gradient_checkpointing: bool
    steps: int                   # the job's learner steps (the schedules' length)
    lr: float
    lr_schedule: str
    warmup_steps: int
    warmup_ratio: float
    min_lr: float
    weight_decay: float
    threads: int                 # torch threads on CPU
    lora: Optional[LoraSettings] = None  # None: full fine-tuning; else the adapters trained (learner.lora)

    @classmethod
    def of(cls, section: Any) -> "LearnerSettings":
        """The settings read from a config section: any object with these attributes."""
        values = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, "lora": LoraSettings.of(values["lora"])})  # a frozen copy, not the pydantic model


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What the objective is built from: the job's ``loss`` section and the rollouts' temperature."""

    name: str                    # loss.name
    params: Any                  # loss.params: the typed model of ``name`` (learner.loss_params)
    teacher_signal: str          # "topk" (the rollout actors') or "full" (a teacher in the rank)
    sampling_temperature: float  # rollout.temperature: the behaviour policy's (AMM's ratios)


@dataclasses.dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank is started with but its place in the group."""

    model_dir: str               # the student
    learner: LearnerSettings
    loss: LossSettings
    seed: int
    pad_id: int
    teacher_dir: Optional[str] = None  # needed by loss.teacher_signal=full only
    vocab_limit: Optional[int] = None  # the tokenizer's size: ids at or past it are padding rows
    # Compare distributions over the first loss_width ids only (None = the student's whole output
    # layer): the tokenizer's ids when the teacher's full logits are used, or when the two output
    # layers are padded apart and the rollouts sample only the tokenizer's ids (cluster.actors).
    loss_width: Optional[int] = None


def deepspeed_config(learner: LearnerSettings, world_size: int) -> dict:
    """The DeepSpeed config for a learner section of the job config."""
    zero = {"stage": learner.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": learner.micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": learner.micro_batch * world_size,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": learner.precision == "bf16"},
        "steps_per_print": 10**9,  # progress is ours to print
        "wall_clock_breakdown": False,
    }


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master: tuple[str, int], spec: LearnerSpec):
        """Rank ``rank`` of ``world_size``, meeting the others at rank 0's ``master`` (ip, port)."""
        learner, loss = spec.learner, spec.loss
        os.environ.update({"MASTER_ADDR": master[0], "MASTER_PORT": str(master[1]),
                           "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
        if learner.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import torch
        torch.set_num_threads(learner.threads)
        torch.manual_seed(spec.seed)
        import deepspeed
        from transformers import AutoModelForCausalLM

        from learner.collectives import collective_backend
        from learner.lora import trainable_parameters, wrap_student
        from learner.objective import make_objective
        from learner.schedule import make_lr_scheduler, warmup_steps

        self.rank, self.world_size, self.pad_id = rank, world_size, spec.pad_id
        self.vocab_limit = spec.vocab_limit
        self.device = torch.device("cuda", torch.cuda.current_device()) if learner.device == "cuda" else torch.device("cpu")
        deepspeed.init_distributed(dist_backend=collective_backend(learner.device))
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
        # teacher_signal=full: the teacher runs here, frozen, and every loss sees its full
        # logits instead of the rollout actors' top-k (exact, at the cost of a teacher forward).
        self.teacher = None
        if loss.teacher_signal == "full":
            if spec.teacher_dir is None:
                raise ValueError("loss.teacher_signal=full needs the teacher model in the learner")
            dtype = torch.bfloat16 if learner.precision == "bf16" else torch.float32
            self.teacher = AutoModelForCausalLM.from_pretrained(spec.teacher_dir, dtype=dtype).to(self.device).eval()
            self.teacher.requires_grad_(False)
        if learner.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        # LoRA: PEFT's adapters go in before DeepSpeed sees the model, so that every ZeRO stage
        # partitions (and checkpoints) the wrapped module; only the adapters are optimised.
        model = wrap_student(model, learner.lora)
        self.lora_scale = learner.lora.scale if learner.lora else 0.0  # unused without adapters
        self.loss_width = spec.loss_width or model.config.vocab_size
        self.objective = make_objective(loss, hidden_size=model.config.hidden_size,
                                        vocab_size=self.loss_width, device=self.device,
                                        steps=learner.steps, temperature=loss.sampling_temperature)
        optimizer = torch.optim.AdamW(trainable_parameters(model), lr=learner.lr, weight_decay=learner.weight_decay)
        # DeepSpeed steps the scheduler inside engine.step() and keeps it in its checkpoints.
        warmup = warmup_steps(learner.steps, learner.warmup_steps, learner.warmup_ratio)
        scheduler = make_lr_scheduler(optimizer, learner.lr_schedule, learner.steps, warmup, learner.min_lr)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=deepspeed_config(learner, world_size))
        self.zero_stage = learner.zero_stage
        self.steps = 0
        self.skipped_nonfinite = 0
        self.tokens = 0
        self.busy_seconds = 0.0
        self.weight_group = None  # the collective transport's side band (join_weight_group), rank 0 only

    @ray.method(concurrency_group="health")
    def ping(self) -> dict[str, Any]:
        """Answers at once, even mid-request: it runs in its own thread (the "health"
        concurrency group), while the work methods stay one at a time (services.liveness)."""
        return ping_answer()

    def ready(self) -> dict[str, Any]:
        import torch.distributed as dist
        return {"rank": self.rank, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
                "zero_stage": self.zero_stage}

    def train_step(self, table: pa.Table) -> dict[str, float]:
        """One optimiser step on this rank's share of ``table`` (rows rank, rank+N, ...)."""
        import torch

        from learner.batch import collate
        from learner.collectives import all_ranks_finite

        t0 = time.time()
        shard = table.take(list(range(self.rank, table.num_rows, self.world_size)))
        n_on = sum(1 for s in table.column("source").to_pylist() if s == "student")
        batch = dataclasses.replace(collate(shard, self.pad_id, self.vocab_limit),
                                    totals=(n_on, table.num_rows - n_on, self.world_size)).to(self.device)
        out = self.engine(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=batch.position_ids, output_hidden_states=self.objective.needs_hidden)
        if self.teacher is not None:
            with torch.no_grad():
                full = self.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    position_ids=batch.position_ids).logits[..., :self.loss_width]
            batch = dataclasses.replace(batch, teacher=batch.response_logits(full).float())
        out.logits = out.logits[..., :self.loss_width]  # a view (the whole layer, mostly): gradients flow
        loss, metrics = self.objective.loss(out, batch)
        # Every rank must take the same branch: skip the step everywhere if any rank saw NaN/inf.
        if not all_ranks_finite(loss):
            self.skipped_nonfinite += 1
            return {"loss": float("nan"), "skipped_nonfinite": 1.0, "tokens": 0.0}
        lr = self.engine.get_lr()[0]  # the rate this step uses
        self.engine.backward(loss)
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        self.objective.after_student_step(out, batch)
        self.steps += 1
        self.tokens += batch.num_tokens
        self.busy_seconds += time.time() - t0
        return {"loss": float(loss.detach()), "tokens": float(batch.num_tokens),
                "skipped_nonfinite": 0.0, "seconds": time.time() - t0, "lr": float(lr),
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), **metrics}

    def _buckets(self, bucket_mib: int, dtype: str):
        from learner.student_dir import gathered_buckets
        import torch
        return gathered_buckets(self.engine.module, self.zero_stage, bucket_mib * 2**20,
                                getattr(torch, dtype), is_rank0=self.rank == 0, scale=self.lora_scale)

    def export_weights(self, transport: str, bucket_mib: int, dtype: str) -> Optional[Any]:
        """Full weights in HF names as ``transport`` sends them (``learner.weight_sync``): every
        rank must call it, because under ZeRO-3 each gathered bucket is a collective; rank 0
        sends. Returns rank 0's result (the buckets for object_store; {"buckets", "bytes",
        "error"} for collective, ``error`` None when the broadcast went through) and None on
        the other ranks. A tied output head is named in the push (``with_tied_head``).
        """
        from learner.student_dir import tied_head, with_tied_head
        from learner.weight_sync import make_transport

        sender = make_transport(transport, bucket_mib=bucket_mib, group=self.weight_group)
        tied = tied_head(self.engine.module)
        gathered = (with_tied_head(bucket, tied) for bucket in self._buckets(bucket_mib, dtype))
        return sender.export(gathered, self.steps, is_rank0=self.rank == 0)

    # -- the side-band group of the collective weight transport (rank 0 only) ------------------
    def open_weight_store(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0: leave any side-band group and host a new rendezvous for the next; returns its
        (ip, port), which the driver hands to the students."""
        from learner.weight_sync import host_rendezvous

        self.close_weight_group()
        self._weight_store, address = host_rendezvous(timeout_s)
        return address

    def join_weight_group(self, size: int, timeout_s: float) -> Optional[str]:
        """Rank 0: form the side-band group (rank 0 of ``size``) on the store ``open_weight_store``
        made, while the students join it. Returns None, or what went wrong (the driver then falls
        back to the object store)."""
        from learner.collectives import collective_backend
        from learner.weight_sync import failure_line, join_group

        try:
            self.weight_group = join_group(self._weight_store, 0, size, collective_backend(self.device.type),
                                           timeout_s)
        except Exception as err:  # noqa: BLE001 - reported, not raised: the job goes on without it
            self.close_weight_group()
            return failure_line(actor_name("learner", 0), err)
        return None

    def close_weight_group(self) -> None:
        """Rank 0: leave the side-band group, if any (its peers' broadcasts fail at once)."""
        group, self.weight_group = self.weight_group, None
        if group is not None:
            group.close()

    def export_student(self, out_dir: str, source_dir: str, dtype: str, bucket_mib: int) -> Optional[str]:
        """Write the student as a HF model directory (rank 0 writes; every rank must call): the
        plain model (a LoRA student merged), and a LoRA student's adapter in ``adapter/``, which
        applies to the base student ``source_dir``."""
        from learner.lora import save_adapter
        from learner.student_dir import gathered_adapter, write_student_dir
        import torch

        adapter = gathered_adapter(self.engine.module, self.zero_stage, is_rank0=self.rank == 0)
        buckets = self._buckets(bucket_mib, dtype)
        if self.rank != 0:
            for _ in buckets:  # take part in every gather
                pass
            return None
        writer = (lambda d: save_adapter(self.engine.module, adapter, d, source_dir)) if adapter else None
        return str(write_student_dir(out_dir, buckets, source_dir, getattr(torch, dtype), writer))

    def save(self, path: str, client_state: dict) -> str:
        """A DeepSpeed checkpoint of every rank under ``path``/deepspeed (model, optimiser,
        scheduler), plus this rank's objective state (AMM's adversaries and their optimisers)
        and RNG states beside it. Every rank must call it."""
        import torch

        root = os.path.join(path, "deepspeed")
        self.engine.save_checkpoint(root, tag=CHECKPOINT_TAG, client_state=client_state)
        extra = {"objective": self.objective.state_dict(), "torch_rng": torch.get_rng_state(),
                 "steps": self.steps, "tokens": self.tokens, "skipped_nonfinite": self.skipped_nonfinite}
        torch.save(extra, os.path.join(root, f"rank{self.rank}-extra.pt"))
        return root

    def load(self, path: str) -> dict:
        """Restore what ``save`` wrote; returns the client state. Every rank must call it."""
        import torch

        root = os.path.join(path, "deepspeed")
        loaded, client_state = self.engine.load_checkpoint(root, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                           load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {root}")
        # weights_only: ammd's own file holds tensors and plain values only; no pickle runs code.
        extra = torch.load(os.path.join(root, f"rank{self.rank}-extra.pt"), weights_only=True)
        self.objective.load_state_dict(extra["objective"])
        torch.set_rng_state(extra["torch_rng"])
        self.steps, self.tokens = extra["steps"], extra["tokens"]
        self.skipped_nonfinite = extra["skipped_nonfinite"]
        return client_state or {}

    def stats(self) -> dict[str, float]:
        return {"rank": self.rank, "steps": self.steps, "tokens": self.tokens,
                "busy_seconds": self.busy_seconds, "skipped_nonfinite": self.skipped_nonfinite}
