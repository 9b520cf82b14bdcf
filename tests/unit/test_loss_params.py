"""Typed loss parameters (learner.loss_params) and the config's ``loss`` section that uses them.

- AMM's defaults are the ones the objective always had;
- a bad value is refused naming its field (``loss.params.<key>``) and what it must be, and
  the message quotes at most ~200 characters of it, however large the value;
- booleans are not numbers, integers are strict, floats are finite;
- YAML and ``loss.params.beta=0.7`` overrides still work, and a dumped config holds the keys
  that were written, so it reads back under another ``loss.name``.
"""
import subprocess
import sys
import time

import pytest
import yaml

from cluster.config import ConfigError, build_config
from learner.loss_params import (LOSS_PARAMS, AMMParams, JSDParams, LossParams, LossParamsError, SkewParams,
                                 loss_names, parse_loss_params, quote)

# The AMM defaults as learner/amm.py's AMM_DEFAULTS held them before the parameters were typed.
AMM_DEFAULTS = {
    "beta": 0.5, "adv_lr": 1e-2, "adv_lr_schedule": "constant", "adv_steps": 1, "head": "logratio_lowrank",
    "head_rank": 64, "tail": "student_mean", "baseline": "loo", "ratio_clip": 2.0, "returns": "full",
    "pg_coef": 0.0, "adversary_class": "chi2", "chi2_lambda": 0.5, "penalty_grad": "detached",
    "adversary": "learned", "beta_schedule": "constant", "beta_start": 1.0, "adv_warmup_steps": 0,
    "anchor_fkl": 0.0, "pg_normalize": False, "chunk_size": 256,
}


def test_defaults_are_unchanged():
    assert AMMParams().model_dump() == AMM_DEFAULTS
    assert JSDParams().model_dump() == {"chunk_size": 256, "beta": 0.5}
    assert SkewParams().model_dump() == {"chunk_size": 256, "alpha": 0.1}
    assert LossParams().model_dump() == {"chunk_size": 256}


def test_every_registered_loss_has_a_params_model():
    from learner.losses import LOSSES
    assert set(LOSS_PARAMS) == {*LOSSES, "amm"} and loss_names() == sorted(LOSS_PARAMS)


@pytest.mark.parametrize("name,params,words", [
    ("amm", {"betta": 0.5}, ["loss.params", "unknown parameter 'betta'", "for loss 'amm'", "'beta'"]),
    ("forward_kl", {"betta": 0.5}, ["unknown parameter 'betta'", "allowed: ['chunk_size']"]),
    ("amm", {"beta": 1.5}, ["loss.params.beta", "a finite number in [0, 1]", "got 1.5"]),
    ("amm", {"tail": "drop"}, ["loss.params.tail", "one of ('student_mean', 'zero')", "got 'drop'"]),
    ("amm", {"head": "big"}, ["loss.params.head", "'logratio_lowrank'", "got 'big'"]),
    ("amm", {"adv_lr": 0}, ["loss.params.adv_lr", "> 0", "got 0"]),
    ("amm", {"ratio_clip": 0.5}, ["loss.params.ratio_clip", ">= 1"]),
    ("amm", {"pg_normalize": 1}, ["loss.params.pg_normalize", "true or false"]),
    ("skew_forward_kl", {"alpha": 2}, ["loss.params.alpha", "[0, 1)", "got 2"]),
    ("skew_reverse_kl", {"alpha": 1.0}, ["loss.params.alpha", "[0, 1)"]),
    ("generalized_jsd", {"beta": -0.1}, ["loss.params.beta", "[0, 1]"]),
    ("sft", {"chunk_size": 0}, ["loss.params.chunk_size", "an integer >= 1"]),
    ("forward-kl", {}, ["unknown loss 'forward-kl'", "loss.name must be one of", "forward_kl"]),
    ("amm", [1, 2], ["loss.params", "must be a mapping"]),
])
def test_bad_params_name_the_field_and_what_it_takes(name, params, words):
    with pytest.raises(LossParamsError) as err:
        parse_loss_params(name, params)
    missing = [w for w in words if w not in str(err.value)]
    assert not missing, f"{missing} not in: {err.value}"


@pytest.mark.parametrize("key", ["head_rank", "adv_steps", "adv_warmup_steps", "chunk_size"])
@pytest.mark.parametrize("bad", [True, False, 2.5, 2.0, "8", None])
def test_integers_are_strict_and_booleans_are_not_integers(key, bad):
    with pytest.raises(LossParamsError, match=f"loss.params.{key} for loss 'amm' must be an integer"):
        parse_loss_params("amm", {key: bad})


@pytest.mark.parametrize("key", ["beta", "adv_lr", "ratio_clip", "pg_coef", "chi2_lambda", "beta_start", "anchor_fkl"])
@pytest.mark.parametrize("bad", [True, float("inf"), float("-inf"), float("nan"), "nan", "abc", 10 ** 400])
def test_floats_are_finite_and_booleans_are_not_numbers(key, bad):
    with pytest.raises(LossParamsError, match=f"loss.params.{key} for loss 'amm' must be a finite number"):
        parse_loss_params("amm", {key: bad})


def test_numbers_are_read_as_floats():
    p = parse_loss_params("amm", {"beta": 1, "adv_lr": "1e-3"})  # YAML reads 1e-3 as a string
    assert p.beta == 1.0 and type(p.beta) is float and p.adv_lr == 1e-3
    assert p.model_dump(exclude_unset=True) == {"beta": 1.0, "adv_lr": 1e-3}


def test_a_huge_value_is_quoted_short_and_fast():
    bomb = yaml.safe_load("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))
    for value in (bomb["i"], "x" * 10_000_000, {"k" * 1000: list(range(1000))}, 10 ** 100_000):
        start = time.perf_counter()
        with pytest.raises(LossParamsError) as err:
            parse_loss_params("amm", {"beta": value})
        assert time.perf_counter() - start < 1.0
        assert len(str(err.value)) < 300 and "loss.params.beta" in str(err.value)
    with pytest.raises(LossParamsError) as err:
        parse_loss_params("amm", {"k" * 10_000_000: 1})
    assert len(str(err.value)) < 600  # the allowed keys plus at most ~200 characters of the key
    assert len(quote("y" * 1000)) == 200


def test_many_bad_keys_make_one_bounded_message():
    with pytest.raises(LossParamsError) as err:
        parse_loss_params("amm", {**{f"k{i}": i for i in range(10_000)}, "beta": 5, "tail": 1, "head": 2, "adv_lr": -1})
    text = str(err.value)
    assert "unknown parameter 'k0' (and 9999 more)" in text and "and 1 more bad values" in text
    assert len(text) < 1000


def test_yaml_config_and_overrides():
    tree = {"loss": {"name": "amm", "params": {"beta": 0.5}}}
    cfg = build_config(tree, ["loss.params.beta=0.7", "loss.params.head=mlp"])
    assert isinstance(cfg.loss.params, AMMParams)
    assert (cfg.loss.params.beta, cfg.loss.params.head, cfg.loss.params.head_rank) == (0.7, "mlp", 64)
    assert cfg.loss.model_dump()["params"] == {"beta": 0.7, "head": "mlp"}  # what was written
    assert cfg.model_dump(mode="json")["loss"]["params"] == {"beta": 0.7, "head": "mlp"}
    # A dumped config reads back, and under another loss once its keys are gone.
    assert build_config(cfg.model_dump()).loss == cfg.loss
    other = build_config(build_config({"loss": {"name": "amm"}}).model_dump(), ["loss.name=generalized_jsd",
                                                                               "loss.params.beta=0.3"])
    assert isinstance(other.loss.params, JSDParams) and other.loss.params.beta == 0.3
    assert type(build_config({}).loss.params) is LossParams


@pytest.mark.parametrize("overrides,words", [
    (["loss.name=amm", "loss.params.head_rank=true"], ["loss.params.head_rank", "an integer >= 1", "got True"]),
    (["loss.name=amm", "loss.params.head=big"], ["loss.params.head", "one of (", "'lowrank'"]),
    (["loss.name=amm", "loss.params.beta=.inf"], ["loss.params.beta", "finite"]),
    (["loss.params={betta: 0.5}"], ["loss.params", "unknown parameter 'betta'", "allowed: ['chunk_size']"]),
    (["loss.name=skew_forward_kl", "loss.params={alpha: 2}"], ["loss.params", "alpha", "got 2"]),
    (["loss.name=forward-kl"], ["unknown loss 'forward-kl'", "loss.name must be one of", "forward_kl"]),
])
def test_config_errors_name_the_field(overrides, words):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    text = str(err.value)
    assert not [w for w in words if w not in text], text
    assert "\n" not in text


def test_assigning_name_reads_the_params_again():
    cfg = build_config({"loss": {"name": "generalized_jsd", "params": {"chunk_size": 8}}})
    cfg.loss.name = "amm"
    assert isinstance(cfg.loss.params, AMMParams) and cfg.loss.params.chunk_size == 8
    cfg.loss.params = {"beta": 0.2}
    assert isinstance(cfg.loss.params, AMMParams) and cfg.loss.params.beta == 0.2


def test_the_params_need_no_torch():
    code = "import sys, learner.loss_params; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
