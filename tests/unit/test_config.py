from pathlib import Path

import pytest

from cluster.config import ConfigError, build_config, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_and_overrides_apply():
    cfg = load_config(ROOT / "configs/local-cpu.yaml", ["learner.steps=7", "loss.name=generalized_jsd", "loss.params={beta: 0.3}"])
    assert cfg.learner.steps == 7
    assert cfg.loss.params.beta == 0.3 and cfg.loss.model_dump()["params"] == {"beta": 0.3}
    assert cfg.learner.zero_stage == 2


def test_unknown_key_names_the_field():
    with pytest.raises(ConfigError, match=r"unknown config key 'learner.stepz'"):
        build_config({"learner": {"stepz": 3}})


def test_unknown_key_from_override_names_the_field():
    with pytest.raises(ConfigError, match=r"unknown config key 'rollout.tempreature'"):
        build_config({}, ["rollout.tempreature=0.5"])


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"'buffer.on_policy_fraction'"):
        build_config({"buffer": {"on_policy_fraction": 1.5}})
    with pytest.raises(ConfigError, match=r"'learner.zero_stage'"):
        build_config({}, ["learner.zero_stage=5"])


def test_models_must_come_in_pairs():
    with pytest.raises(ConfigError, match="models.teacher and models.student"):
        build_config({"models": {"teacher": "/x"}})


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("nonsense")


def test_placement_fields_default_to_any_node_and_pack():
    cfg = build_config({})
    assert cfg.learner.resources == {} and cfg.learner.placement_strategy == "PACK"
    assert cfg.rollout.student.resources == {} and cfg.rollout.teacher.resources == {}


def test_placement_fields_take_custom_resources_per_kind():
    cfg = build_config({}, ["learner.resources={learner_node: 1}", "learner.placement_strategy=STRICT_SPREAD",
                            "rollout.student.resources={rollout_node: 0.5}"])
    assert cfg.learner.resources == {"learner_node": 1.0} and cfg.learner.placement_strategy == "STRICT_SPREAD"
    assert cfg.rollout.student.resources == {"rollout_node": 0.5} and cfg.rollout.teacher.resources == {}


@pytest.mark.parametrize("override,match", [
    ("learner.resources={CPU: 1}", r"learner.resources: 'CPU' is one of Ray's own resources"),
    ("rollout.teacher.resources={GPU: 1}", r"rollout.teacher.resources: 'GPU' is one of Ray's own"),
    ("rollout.student.resources={rollout_node: 0}", r"rollout.student.resources: rollout_node=0.0 must be > 0"),
    ("learner.placement_strategy=STRICT_PACK", r"'learner.placement_strategy'"),
])
def test_bad_placement_fields_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, [override])
