"""Each loss's parameters as a typed model: what ``loss.params`` may hold, chosen by ``loss.name``.

One pydantic model per loss (``LOSS_PARAMS``). Each lists its options as Literal types,
forbids unknown keys, bounds its numbers, takes finite floats only (no inf or nan), and takes
no boolean where a number is meant (YAML's ``true`` would otherwise pass as 1). Integers are
strict: 2.5 and "8" are refused. ``parse_loss_params(name, mapping)`` validates a mapping for
the loss ``name`` and raises ``LossParamsError`` naming the field (``loss.params.<key>``), what
it must be (the allowed values or bounds) and at most ~200 characters of what it got.

The models carry no maths. What a value does is said in its field's description and in
``learner.losses`` / ``learner.amm``; what the defaults measured is in BENCHMARKS.md. No torch
here: ``cluster.config`` validates a job with these before any actor starts.

A new AMM variant adds its name to the option's Literal here and its class to the registry
beside it (``learner.amm_heads.CLASSES``/``HEADS``, ``learner.amm_returns.RETURNS``/
``BASELINES``, ``learner.amm.ADVERSARIES``); a unit test keeps the two in step.
"""
from __future__ import annotations

import reprlib
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt
from pydantic import (AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt,
                      ValidationError)
from pydantic.fields import FieldInfo

from learner.constants import DEFAULT_CHUNK_SIZE, DEFAULT_HEAD_RANK

QUOTE_LIMIT = 200  # the most characters of a bad value an error message quotes
MAX_REPORTED = 3   # errors spelled out in one message; the rest are counted


class LossParamsError(ValueError):
    """``loss.name`` or ``loss.params`` is wrong; the message names the field and the fix."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# A finite float: ints are taken (1 -> 1.0), booleans, inf and nan are not.
Number = Annotated[float, BeforeValidator(_not_bool), AllowInfNan(False)]

# The options, in the order error messages list them.
HeadName = Literal["linear", "mlp", "logratio", "lowrank", "logratio_lowrank"]
ClassName = Literal["bounded", "chi2"]
AdversaryName = Literal["learned", "oracle"]
TailName = Literal["student_mean", "zero"]
BaselineName = Literal["loo", "none"]
ReturnsName = Literal["full", "to_go"]
PenaltyGradName = Literal["detached", "full"]
BetaScheduleName = Literal["constant", "linear"]
ScheduleName = Literal["constant", "linear", "cosine"]  # learner.schedule.SCHEDULES


class LossParams(BaseModel):
    """What every loss takes; the losses without options of their own use it as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chunk_size: StrictInt = Field(DEFAULT_CHUNK_SIZE, ge=1, description=(
        "positions the loss's maths handles at a time: one chunk's [chunk, V] intermediates are alive"))


class JSDParams(LossParams):
    """``generalized_jsd``: beta KL(p||m) + (1 - beta) KL(q||m), m = beta p + (1 - beta) q."""

    beta: Number = Field(0.5, ge=0, le=1, description="the mixture weight; 0 = forward KL, 1 = reverse KL")


class SkewParams(LossParams):
    """``skew_forward_kl`` KL(p || a p + (1 - a) q) and ``skew_reverse_kl`` KL(q || (1 - a) p + a q)."""

    alpha: Number = Field(0.1, ge=0, lt=1, description="the skew a; 0 = the plain KL")


class AMMParams(LossParams):
    """``amm`` (learner.amm): L = beta D_off(f_off) + (1 - beta) D_on(f_on), two adversaries."""

    beta: Number = Field(0.5, ge=0, le=1, description=(
        "weight of the off-policy distance; 0 = on-policy only, 1 = off-policy only"))
    adv_lr: Number = Field(1e-2, gt=0, description="Adam learning rate of the adversaries")
    adv_lr_schedule: ScheduleName = Field("constant", description=(
        "the adversaries' rate over the learner's steps (learner.schedule); they must keep "
        "tracking the student to the end"))
    adv_steps: StrictInt = Field(1, ge=0, description="adversary ascent steps per student step")
    head: HeadName = Field("logratio_lowrank", description=(
        "the Q-head kind (learner.amm_heads); the low-rank kinds do not grow as hidden x V"))
    head_rank: StrictInt = Field(DEFAULT_HEAD_RANK, ge=1, description=(
        "r of the low-rank heads: (hidden + V) r + V parameters each"))
    tail: TailName = Field("student_mean", description=(
        "f over the teacher's top-k tail: the student-weighted mean of f there, or 0"))
    baseline: BaselineName = Field("loo", description=(
        "the policy-gradient baseline: leave-one-out mean over the other on-policy rows, or none"))
    ratio_clip: Number = Field(2.0, ge=1, description="cap of the per-token importance ratio q / mu of older rows")
    returns: ReturnsName = Field("full", description=(
        "credit of an action: the row's whole return (exact with EOS) or the return-to-go "
        "(lower variance, exact for fixed lengths only)"))
    pg_coef: Number = Field(0.0, ge=0, description=(
        "weight of the policy-gradient term: 1 = the exact gradient of D_on, 0 = on-policy "
        "states treated as data (as GKD-style trainers do)"))
    adversary_class: ClassName = Field("chi2", description=(
        "the adversaries' function class: chi2 (unbounded, penalised) or bounded (f in [-1, 1], the paper's)"))
    chi2_lambda: Number = Field(0.5, gt=0, description=(
        "the chi2 penalty's weight lam: best response (p/q - 1) / (2 lam); 0.5 gives the student "
        "forward KL's gradient q - p at the optimum"))
    penalty_grad: PenaltyGradName = Field("detached", description=(
        "chi2: the student descends the gap (detached: forward KL's direction) or gap - penalty "
        "too (full: the gradient of chi^2)"))
    adversary: AdversaryName = Field("learned", description=(
        "learned heads, or the class's analytic best response (oracle: what the objective does "
        "with a perfect adversary)"))
    beta_schedule: BetaScheduleName = Field("constant", description=(
        "constant beta, or linear from beta_start to beta over the job's steps"))
    beta_start: Number = Field(1.0, ge=0, le=1, description="beta at the first step of a linear beta_schedule")
    adv_warmup_steps: StrictInt = Field(0, ge=0, description=(
        "extra adversary steps on the first batch, before the student moves"))
    anchor_fkl: Number = Field(0.0, ge=0, description=(
        "weight of a forward-KL anchor added to the student's loss (0 = AMM only)"))
    pg_normalize: StrictBool = Field(False, description=(
        "divide the policy-gradient advantages by their spread (returns=full)"))


LOSS_PARAMS: dict[str, type[LossParams]] = {
    "amm": AMMParams,
    "forward_kl": LossParams,
    "generalized_jsd": JSDParams,
    "reverse_kl": LossParams,
    "sft": LossParams,
    "skew_forward_kl": SkewParams,
    "skew_reverse_kl": SkewParams,
    "tv_distance": LossParams,
}


def loss_names() -> list[str]:
    """Every value ``loss.name`` may take."""
    return sorted(LOSS_PARAMS)


# ------------------------------------------------------------------------------ messages

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = QUOTE_LIMIT
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxlong = 60


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) cut to at most ``limit`` characters, built without ever writing the whole
    repr (a YAML value made of aliases can expand to gigabytes)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int past Python's digit limit
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _bound(meta: list, lower: bool) -> Optional[tuple[Any, bool]]:
    """(bound, closed) of a field's lower or upper bound, None when it has none."""
    closed, open_ = (Ge, Gt) if lower else (Le, Lt)
    for m in meta:
        if isinstance(m, closed):
            return getattr(m, "ge" if lower else "le"), True
        if isinstance(m, open_):
            return getattr(m, "gt" if lower else "lt"), False
    return None


def expected(field: FieldInfo) -> str:
    """What a field takes, in words: its allowed values, or its type and bounds."""
    ann = field.annotation
    if get_origin(ann) is Literal:
        return f"one of {get_args(ann)}"
    if ann is bool:
        return "true or false"
    kind = "an integer" if ann is int else "a finite number"
    lo, hi = _bound(field.metadata, True), _bound(field.metadata, False)
    if lo and hi:
        return f"{kind} in {'[' if lo[1] else '('}{lo[0]}, {hi[0]}{']' if hi[1] else ')'}"
    if lo:
        return f"{kind} {'>=' if lo[1] else '>'} {lo[0]}"
    if hi:
        return f"{kind} {'<=' if hi[1] else '<'} {hi[0]}"
    return kind


def _unknown(name: str, model: type[LossParams], keys: list) -> str:
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    return (f"loss.params: unknown parameter {quote(keys[0])}{more} for loss {name!r}; "
            f"allowed: {sorted(model.model_fields)}")


def describe(name: str, model: type[LossParams], err: ValidationError) -> str:
    """One line for the user from a params model's errors: the unknown keys, then up to
    MAX_REPORTED bad values, each naming its field, what it must be and what it got."""
    errors = err.errors(include_url=False)
    unknown = [e["loc"][0] for e in errors if e["loc"] and e["loc"][0] not in model.model_fields]
    bad = [e for e in errors if e["loc"] and e["loc"][0] in model.model_fields]
    lines = [_unknown(name, model, unknown)] if unknown else []
    lines += [f"loss.params.{e['loc'][0]} for loss {name!r} must be {expected(model.model_fields[e['loc'][0]])}, "
              f"got {quote(e['input'])}" for e in bad[:MAX_REPORTED]]
    more = len(bad) - MAX_REPORTED
    return "; ".join(lines) + (f"; and {more} more bad values" if more > 0 else "")


# ------------------------------------------------------------------------------- parsing

def params_model(name: Any) -> type[LossParams]:
    """The params model of the loss ``name``; LossParamsError listing the losses otherwise."""
    if not isinstance(name, str) or name not in LOSS_PARAMS:
        raise LossParamsError(f"unknown loss {quote(name)}; loss.name must be one of {loss_names()}")
    return LOSS_PARAMS[name]


def parse_loss_params(name: str, params: Any = None) -> LossParams:
    """``params`` (a mapping, None or a params model) validated for the loss ``name``.

    The result remembers which keys were given (``model_dump(exclude_unset=True)``), so a
    config written back out holds what the user wrote, not every default.
    """
    model = params_model(name)
    if isinstance(params, LossParams):
        if type(params) is model:
            return params
        params = params.model_dump(exclude_unset=True)  # another loss's: read its keys again
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise LossParamsError(f"loss.params for loss {name!r} must be a mapping of parameter names to "
                              f"values, e.g. {{chunk_size: 256}}, got {quote(params)}")
    try:
        return model.model_validate(dict(params))
    except ValidationError as err:
        raise LossParamsError(describe(name, model, err)) from None
