"""The job's configuration: pydantic models read from YAML plus ``a.b=c`` overrides.

Every model forbids unknown keys, so a typo fails at start-up with the field's dotted path
instead of being silently ignored. ``load_config`` is the only entry point the CLI uses.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_serializer,
                      field_validator, model_validator)

from cluster import yaml_strict
from learner.loss_params import LossParams, params_model, parse_loss_params


class ConfigError(ValueError):
    """A configuration problem, phrased for the user (field path and the fix)."""


class _Strict(BaseModel):
    # allow_inf_nan=False: inf or nan is never a learning rate, temperature or resource amount.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# Ray's own resources have their own options (num_cpus, num_gpus, memory); only custom ones here.
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def check_resources(resources: dict[str, float], where: str) -> None:
    """Raise ValueError naming ``where`` (the field's dotted path) unless every key is a custom Ray
    resource asked for in a positive amount."""
    for name, amount in resources.items():
        if name in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{where}: {name!r} is one of Ray's own resources; CPUs and GPUs come from "
                             f"their own fields, so name a custom resource (e.g. learner_node)")
        if amount <= 0:
            raise ValueError(f"{where}: {name}={amount} must be > 0 (leave the key out to ask for none)")


def _resources_field(kind: str) -> Any:
    return Field(default_factory=dict, description=(
        f"Ray custom resources each {kind} asks for, e.g. {{learner_node: 1}}: it runs only on nodes "
        f"started with them (ray start --resources='{{\"learner_node\": 2}}'); empty = any node"))


class ModelsConfig(_Strict):
    """Two Hugging Face causal-LM directories (or hub ids on a cluster) with one vocabulary.

    ``toy`` builds the embedded tiny teacher and student (see ``tasks.build``) when the
    directories are left empty; a user's run sets ``teacher`` and ``student`` instead.
    """

    teacher: Optional[str] = None
    student: Optional[str] = None
    toy_task: str = "sort"
    toy_root: str = "artifacts/toy"
    toy_chat: Optional[Literal["llama", "llama_tied", "qwen2", "qwen3", "gemma2"]] = Field(
        None, description="with both models empty: the locally built chat pair of this architecture "
                          "(tasks.chat_models, messages data, cached under <toy_root>/../chat) instead of toy_task's")


class DataConfig(_Strict):
    """Rows as JSONL, Parquet or a saved HF dataset dir: ``{"messages": [...]}``, TRL's
    ``{"prompt": [...], "completion": [...]}`` or ``{"prompt": ..., "response": ...}`` (cluster.chat)."""

    train: Optional[str] = None
    eval: Optional[str] = None
    chat_template: str = Field(
        "auto", min_length=1, description="auto = the student's tokenizer's own template (raw text if it "
        "has none); none = raw text; else the path of a Jinja template used for both models")
    system_prompt: Optional[str] = Field(
        None, min_length=1, description="a system turn put before every conversation that has none "
                                        "(needs a chat template)")
    max_prompt_tokens: int = Field(128, gt=0)
    max_response_tokens: int = Field(64, gt=0)
    eval_size: int = Field(200, gt=0, description="held-out prompts scored before and after")


class EvalConfig(_Strict):
    metric: Literal["exact_match", "rouge_l", "bleu", "final_answer"] = "exact_match"
    every: int = Field(0, ge=0, description="learner steps between evaluations; 0 = only before/after")


class EngineResources(_Strict):
    """What one rollout actor of a kind (student or teacher) holds: the two kinds differ on a
    GPU cluster (a 8B teacher over 2 GPUs, a 1B student on a slice of one)."""

    gpus: float = Field(0.0, ge=0, description="GPUs per actor; > 0 puts its engine on CUDA")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor-parallel ranks; needs gpus >= it")
    gpu_memory_utilization: Optional[float] = Field(
        None, gt=0, le=1, description="share of each GPU vLLM may take (weights, activations, KV "
                                      "cache); None = the KV cache is capped at kv_cache_mib instead")
    resources: dict[str, float] = _resources_field("rollout actor of this kind")

    @model_validator(mode="after")
    def _fits(self) -> "EngineResources":
        if self.tensor_parallel_size > 1 and self.gpus < self.tensor_parallel_size:
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} needs gpus >= "
                             f"{self.tensor_parallel_size} per actor (got gpus={self.gpus}); raise gpus")
        if self.gpu_memory_utilization is not None and self.gpus == 0:
            raise ValueError("gpu_memory_utilization is set but gpus=0: the engine runs on CPU; "
                             "set gpus or use rollout.kv_cache_mib")
        return self


class RolloutConfig(_Strict):
    engine: Literal["vllm", "hf"] = "vllm"
    student_actors: int = Field(1, ge=1)
    teacher_actors: int = Field(1, ge=1)
    temperature: float = Field(1.0, gt=0)
    topk: int = Field(20, ge=1, description="teacher log-probs kept per response position")
    prompts_per_batch: int = Field(32, ge=1, description="prompts per rollout request")
    kv_cache_mib: int = Field(256, ge=16, description="vLLM KV cache cap per engine (CPU RAM or GPU)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    student: EngineResources = EngineResources()
    teacher: EngineResources = EngineResources()
    enforce_eager: Optional[bool] = Field(
        None, description="None = eager on CPU, CUDA graphs on GPU (faster decoding, slower start)")
    threads: int = Field(1, ge=1, description="torch/OpenMP threads per rollout actor on CPU")
    max_restarts: int = Field(3, ge=0, description="restarts of one lost rollout actor allowed within "
                                                   "restart_window_s before the job fails")
    restart_window_s: float = Field(3600.0, gt=0)
    off_policy: Literal["teacher", "dataset"] = Field(
        "teacher", description="off-policy rows: the teacher's samples, or the training file's own "
                               "responses scored by the teacher (SFT and ground-truth KD)")

    @model_validator(mode="after")
    def _custom_resources(self) -> "RolloutConfig":
        for role in ("student", "teacher"):
            check_resources(getattr(self, role).resources, f"rollout.{role}.resources")
        return self


class BufferConfig(_Strict):
    capacity_rows: int = Field(100_000, gt=0)
    on_policy_fraction: float = Field(0.5, ge=0, le=1)
    max_staleness: int = Field(1, ge=0, description="weight versions an on-policy row may lag; 0 = synchronous")
    spill: bool = Field(True, description="seal every appended batch on disk (Arrow IPC), so a "
                                          "restarted buffer recovers the acknowledged rows")
    spill_dir: Optional[str] = Field(None, description="where; None = <output_dir>/<name>/buffer")
    on_policy_uses: int = Field(1, ge=1, description="times a student row may be trained on")
    off_policy_uses: int = Field(1, ge=1, description="times a teacher/dataset row may be trained on "
                                                     "(1 = every row distinct, as in TRL)")


class LoraConfig(_Strict):
    """LoRA adapters on the student (learner.lora, PEFT): W' = W + (alpha / r) B @ A per targeted
    linear layer; only A and B train, and pushes and exports carry the merged W'."""

    r: int = Field(8, ge=1, description="the adapters' rank")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input while training")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="all-linear = every linear layer but the output head; or module "
                                  "names, e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]")

    @field_validator("target_modules")
    @classmethod
    def _named_modules(cls, targets: str | list[str]) -> str | list[str]:
        if isinstance(targets, list) and (not targets or not all(t.strip() for t in targets)):
            raise ValueError(f"learner.lora.target_modules={targets!r} must name at least one module, "
                             f"none of them empty (e.g. [q_proj, v_proj]), or be all-linear")
        return targets


class LearnerConfig(_Strict):
    actors: int = Field(2, ge=1)
    zero_stage: Literal[0, 1, 2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["cpu", "cuda"] = "cpu"
    lr: float = Field(1.0e-4, gt=0, description="peak learning rate")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay from lr to min_lr over the steps after warm-up (learner/schedule.py)")
    warmup_steps: int = Field(0, ge=0, description="steps of linear warm-up to lr (wins over warmup_ratio)")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up as a fraction of steps")
    min_lr: float = Field(0.0, ge=0, description="the rate the decay ends at")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    micro_batch: int = Field(8, ge=1, description="rows per learner actor per step")
    steps: int = Field(300, ge=1)
    sync_every: int = Field(10, ge=1)
    save_every: int = Field(100, ge=0, description="steps between checkpoints (and at the end); 0 = none")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    gradient_checkpointing: bool = False
    weight_transport: Literal["object_store", "collective"] = Field(
        "object_store", description="how pushes reach the student rollout actors: object_store = rank 0's "
        "buckets through Ray's object store; collective = rank 0 broadcasts each bucket as it is gathered "
        "on a side-band group with the students (gloo on cpu, NCCL on cuda: student actors need GPUs "
        "then), falling back to the object store when that fails and for a restarted student's first load")
    bucket_mib: int = Field(64, ge=1)
    threads: int = Field(1, ge=1, description="torch threads per learner actor on CPU")
    resources: dict[str, float] = _resources_field("learner rank (and its placement-group bundle)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the learner ranks' bundles: PACK = as few nodes "
                            "as fit (the collective stays local), STRICT_SPREAD = one rank per node")
    lora: Optional[LoraConfig] = Field(
        None, description="LoRA adapters instead of full fine-tuning (learner/lora.py); None = every "
                          "weight trains")

    @model_validator(mode="after")
    def _schedule_fits(self) -> "LearnerConfig":
        check_resources(self.resources, "learner.resources")
        if self.min_lr > self.lr:
            raise ValueError(f"learner.min_lr={self.min_lr} is above learner.lr={self.lr}; the "
                             f"schedule decays from lr down to min_lr, so set min_lr <= lr")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"learner.warmup_steps={self.warmup_steps} leaves no step of the "
                             f"{self.steps} learner.steps after warm-up; lower it")
        return self


class LossConfig(_Strict):
    name: str = Field("forward_kl", description="the loss (learner.loss_params.LOSS_PARAMS)")
    teacher_signal: Literal["topk", "full"] = Field(
        "topk", description="topk: rollout.topk log-probs from the teacher actors; full: the "
                            "teacher's full logits from a frozen copy inside each learner rank")
    params: LossParams = Field(default_factory=dict, validate_default=True, description=(
        "the loss's parameters, typed by loss.name (learner.loss_params: one model per loss)"))

    # Checked here, not in the learner actors, so a typo fails before anything starts.
    @field_validator("name")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        params_model(name)  # names loss.name and the known losses
        return name

    @field_validator("params", mode="before")
    @classmethod
    def _typed_params(cls, params: Any, info: ValidationInfo) -> LossParams:
        if "name" not in info.data:  # loss.name is wrong: its error is the one to read
            return LossParams()
        return parse_loss_params(info.data["name"], params)

    @model_validator(mode="after")
    def _params_fit_the_name(self) -> "LossConfig":
        if type(self.params) is not params_model(self.name):  # loss.name set on a built config
            object.__setattr__(self, "params", parse_loss_params(self.name, self.params))
        return self

    @field_serializer("params")
    def _params_as_written(self, params: LossParams) -> dict[str, Any]:
        # The keys given, not every default: a dumped config reads back under another loss.name
        # (build_config(cfg.model_dump(), ["loss.name=..."])) and a checkpoint's copy compares
        # with what was written.
        return params.model_dump(exclude_unset=True)


class StatusConfig(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0 = any free port")


class TrackingConfig(_Strict):
    """Where the job's curves go besides /status: TensorBoard event files in
    ``<output_dir>/<name>/tb`` and, when a project is named, Weights & Biases (cluster.tracking)."""

    tensorboard: bool = Field(True, description="write TensorBoard event files to <output_dir>/<name>/tb")
    wandb_project: Optional[str] = Field(
        None, min_length=1, description="W&B project to log to (None = the WANDB_PROJECT variable, "
                                        "else no W&B); needs `pip install wandb`")


class RayConfig(_Strict):
    address: Optional[str] = Field(None, description="None = embedded ray.init; 'auto' or ray://... = connect")
    num_cpus: Optional[int] = Field(None, ge=1, description="for the embedded cluster only")
    actor_timeout_s: float = Field(600.0, gt=0, description="longest wait for any actor's answer; "
                                                            "past it the job fails naming the actor")


class JobConfig(_Strict):
    name: str = Field("local-cpu", description="the run's directory under output_dir: a plain name")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="every RNG of the job (numpy, torch, vLLM)")
    output_dir: str = "runs"
    models: ModelsConfig = ModelsConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    rollout: RolloutConfig = RolloutConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    loss: LossConfig = LossConfig()
    status: StatusConfig = StatusConfig()
    tracking: TrackingConfig = TrackingConfig()
    ray: RayConfig = RayConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The name becomes <output_dir>/<name>: a path in it would put the run elsewhere.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", name):
            raise ValueError(f"name={yaml_strict.shorten(repr(name), 60)} must be a plain name of letters, "
                             f"digits, '.', '_' and '-' (no '/', not starting with '.'), at most 128 "
                             f"characters: it names the run's directory under output_dir")
        return name

    @model_validator(mode="after")
    def _sections_agree(self) -> "JobConfig":
        """Checks that span sections: the models come in pairs, own models come with data, and
        the buffer holds at least one learner batch (else no step is ever sampled: a livelock)."""
        if (self.models.teacher is None) != (self.models.student is None):
            raise ValueError("models.teacher and models.student must both be set, or both left "
                             "empty to build the toy models")
        if (self.models.teacher is not None) and self.data.train is None:
            raise ValueError("data.train must name the prompt file when your own models are set")
        rows = self.learner.micro_batch * self.learner.actors
        if self.buffer.capacity_rows < rows:
            raise ValueError(f"buffer.capacity_rows={self.buffer.capacity_rows} is below one learner "
                             f"batch (learner.micro_batch x learner.actors = {rows} rows), so no step "
                             f"could ever be sampled; raise buffer.capacity_rows to at least {rows}")
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into (["a", "b"], value); the value is parsed as YAML (1, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return path, None
    try:
        return path, yaml_strict.load(raw)
    except yaml_strict.YamlProblem as err:
        raise ConfigError(f"override {yaml_strict.shorten(repr(text), 80)}: its value {err}; write "
                          f"the value as YAML (a list as [1, 2], a string in quotes)") from None


def _apply(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1], 1):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            where = ".".join(path[:i])
            raise ConfigError(f"override {'.'.join(path)}: {where} is a value, not a section; set it "
                              f"with {where}=VALUE")
        node = nxt
    node[path[-1]] = value


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{where}': remove it or check its spelling "
                         f"(see configs/local-cpu.yaml for the known keys)")
        elif e["type"] == "value_error":
            # A validator's own message names its fields and the fix; pydantic's prefix does not help.
            lines.append(yaml_strict.shorten(str(e.get("ctx", {}).get("error", e["msg"])), 400))
        else:
            got = yaml_strict.shorten(repr(e.get("input")), 60)
            lines.append(f"config field '{where}': {e['msg']} (got {got})")
    return "; ".join(lines)


def build_config(tree: dict, overrides: list[str] = ()) -> JobConfig:
    """Validate a config tree with overrides applied; raise ConfigError with field paths."""
    tree = dict(tree or {})
    for text in overrides:
        path, value = parse_override(text)
        _apply(tree, path, value)
    try:
        return JobConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def load_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """Read a YAML file and apply ``a.b=c`` overrides."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give the path of a YAML config file "
                          f"(e.g. configs/local-cpu.yaml)")
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {path} {what}; give the path of a YAML config "
                          f"(e.g. configs/local-cpu.yaml)")
    try:
        tree = yaml_strict.load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} is "
                          f"{err.object[err.start]:#04x}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or type(err).__name__})") from None
    except yaml_strict.YamlProblem as err:
        raise ConfigError(f"config file {path} {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level (sections such as "
                          f"'learner:' and 'data:'), not a {type(tree).__name__}")
    return build_config(tree, overrides)
