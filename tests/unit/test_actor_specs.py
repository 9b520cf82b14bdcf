"""What crosses the Ray edge into the actors: typed, frozen sections built from the job config
(cluster.actors), never dicts. They must carry what the actors used to read out of the dumps."""
import dataclasses
import pickle

import pytest

from cluster.actors import engine_options, learner_spec, rollout_spec
from cluster.config import build_config
from cluster.models import ModelPair
from learner.learner_actor import LearnerSettings, deepspeed_config
from learner.loss_params import AMMParams

PAIR = ModelPair(tokenizer=None, vocab_size=48, pad_id=3, stop_token_ids=[2, 5], max_model_len=64)


def test_the_learner_spec_holds_the_learner_and_loss_sections_and_the_temperature():
    cfg = build_config({"loss": {"name": "amm", "params": {"beta": 0.3}}}, ["rollout.temperature=0.7"])
    spec = learner_spec(cfg, "/s", PAIR, "/t")
    assert pickle.loads(pickle.dumps(spec)) == spec  # what Ray does with it
    assert dataclasses.asdict(spec.learner) == {f: v for f, v in cfg.learner.model_dump().items()
                                                if f in {x.name for x in dataclasses.fields(LearnerSettings)}}
    assert isinstance(spec.loss.params, AMMParams) and spec.loss.params.beta == 0.3
    assert (spec.loss.name, spec.loss.teacher_signal, spec.loss.sampling_temperature) == ("amm", "topk", 0.7)
    assert (spec.model_dir, spec.teacher_dir, spec.seed, spec.pad_id) == ("/s", "/t", cfg.seed, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


def test_the_deepspeed_config_reads_the_settings():
    cfg = build_config({"learner": {"micro_batch": 4, "zero_stage": 3, "precision": "bf16", "grad_clip": 0.5}})
    ds = deepspeed_config(LearnerSettings.of(cfg.learner), world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"], ds["gradient_clipping"]) == (4, 8, 0.5)
    assert ds["zero_optimization"] == {"stage": 3} and ds["bf16"] == {"enabled": True}


def test_the_rollout_spec_and_its_engine_options():
    cfg = build_config({"rollout": {"topk": 32, "temperature": 0.9, "threads": 2}})
    spec = rollout_spec(cfg, "teacher", "/t", PAIR, 1)
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert (spec.role, spec.engine, spec.model_dir, spec.topk, spec.temperature, spec.threads) == \
        ("teacher", "vllm", "/t", 32, 0.9, 2)
    assert spec.stop_token_ids == (2, 5) and spec.max_response_tokens == cfg.data.max_response_tokens
    o = spec.options
    assert (o.seed, o.kv_cache_mib, o.max_model_len, o.max_logprobs, o.eager, o.logprobs_mode) == \
        (cfg.seed + 1007, cfg.rollout.kv_cache_mib, 64, 32, True, "raw_logprobs")
    assert engine_options(cfg, "student", PAIR, 0).logprobs_mode == "processed_logprobs"


def test_the_hf_engine_gets_its_device():
    cfg = build_config({"rollout": {"engine": "hf", "student": {"gpus": 1}}})
    o = engine_options(cfg, "student", PAIR, 0)
    assert (o.device, o.seed, o.dtype) == ("cuda", cfg.seed, cfg.rollout.dtype)
    assert engine_options(cfg, "teacher", PAIR, 0).device == "cpu"


def test_a_pair_padded_apart_samples_only_the_tokenizers_ids_and_the_learner_knows_the_limit():
    cfg = build_config({})
    same = dataclasses.replace(PAIR, widths=(64, 64))
    apart = dataclasses.replace(PAIR, widths=(80, 64))
    assert rollout_spec(cfg, "student", "/s", same, 0).token_limit is None
    assert {rollout_spec(cfg, role, "/m", apart, 0).token_limit for role in ("student", "teacher")} == {48}
    assert learner_spec(cfg, "/s", same, "/t").vocab_limit == learner_spec(cfg, "/s", apart, "/t").vocab_limit == 48
    # the learner compares over the ids the rollouts may sample (all rows when widths agree)
    assert learner_spec(cfg, "/s", same, "/t").loss_width is None
    assert learner_spec(cfg, "/s", apart, "/t").loss_width == 48
    full = build_config({"loss": {"teacher_signal": "full"}})
    assert learner_spec(full, "/s", same, "/t").loss_width == 48
