"""A short chat-data job per architecture, for real: vLLM-CPU rollouts, a DeepSpeed learner, the
student exported and reloaded with transformers and vLLM.

Each job trains on ``messages`` rows rendered with the family's chat template (tasks.chat_models).
Parity, read back from the job's own replay buffer and laid out by the learner's ``collate``:
- the teacher actor's top-k log-probs equal a float64 HF forward at the same positions;
- the student actor's behaviour log-probs of its version-0 rows equal a float64 HF forward of the
  student it started from (rollout.temperature is 1, so processed = raw log-probs).
Tolerance 1e-3: vLLM-CPU in float32 was measured within 1e-5 of float64 on these models (scoring
one sequence), and a batch adds float32 reduction-order noise; a misaligned position, a teacher
scored at another temperature or a soft-cap left out differs by 1e-1 or more.
"""
import dataclasses
from pathlib import Path

import pytest
import torch

from cluster.config import load_config
from tasks.chat_models import ARCHS, build_chat_world
from tests.parity import behaviour_error, buffer_rows, teacher_topk_error

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-3


def chat_job(world, out: Path, name: str, *more: str):
    return load_config(ROOT / "configs" / "local-cpu.yaml", [
        f"name={name}", f"output_dir={out}", f"models.teacher={world.teacher_dir}",
        f"models.student={world.student_dir}", f"data.train={world.train_path}",
        f"data.eval={world.eval_path}", "data.max_prompt_tokens=48", "data.max_response_tokens=16",
        "data.eval_size=16", "learner.actors=1", "learner.micro_batch=8", "learner.steps=4",
        "learner.sync_every=2", "learner.save_every=0", "rollout.prompts_per_batch=16",
        "rollout.topk=8", "rollout.kv_cache_mib=32", "status.enabled=false",
        "tracking.tensorboard=false", "eval.every=0", *more])


def reload_student(student_dir: Path, prompt_ids: list[int]) -> None:
    """The export loads in transformers and in vLLM, and both decode the same greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollout.engine import EngineOptions, SamplingConfig, make_engine
    hf = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)  # stops on its EOS ids
    engine = make_engine("vllm", str(student_dir), EngineOptions(kv_cache_mib=16, max_model_len=64))
    got = engine.generate([prompt_ids], SamplingConfig(6, 0.0))[0].response_ids.tolist()
    want = out[0, len(prompt_ids):].tolist()
    assert got == want, (got, want)  # both stop on the end-of-turn id of generation_config.json
    del engine


def run_and_check(world, tmp_path, name, *more):
    from cluster.driver import run_job
    from cluster.preflight import check_inputs
    cfg = chat_job(world, tmp_path, name, *more)
    inputs = check_inputs(cfg)
    assert inputs.pair.chat.template is not None  # the rows were rendered, not fed raw
    stops = set(inputs.pair.stop_token_ids)
    assert len(stops) == 2 and all(p.reference_ids[-1] in stops for p in inputs.evals)
    report = run_job(cfg)
    assert report["steps"] == 4 and report["lost_rows"] == 0, report
    rows = buffer_rows(tmp_path / name)
    pad = inputs.pair.pad_id
    assert teacher_topk_error(str(world.teacher_dir), rows, pad) < TOLERANCE
    limit = inputs.pair.vocab_size if inputs.pair.padded_apart else None
    err, tokens = behaviour_error(str(world.student_dir), rows, pad, limit)
    assert tokens > 0 and err < TOLERANCE, (err, tokens)
    reload_student(Path(report["student_dir"]), inputs.evals[0].ids)
    return inputs, report, rows


# Qwen2's job is the padded pair's below (the same checks on a Qwen2 pair): one job fewer keeps
# make test within 20 minutes on 2 cores.
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "qwen2"])
def test_a_chat_job_per_architecture(arch, tmp_path, ray_cluster):
    world = build_chat_world(ROOT / "artifacts" / "chat", arch)
    if arch != "llama":
        run_and_check(world, tmp_path, f"chat-{arch}")
        return
    # Llama's job trains a LoRA student (learner.lora through ammd run): every check above holds
    # on the merged weights the rollouts and the export carry, the export holds the adapter, and
    # only the targeted layers moved.
    _, report, _ = run_and_check(world, tmp_path, "chat-llama-lora", "learner.lora={r: 4, target_modules: [q_proj, v_proj]}",
                                 "learner.lr=1e-2")
    exported = Path(report["student_dir"])
    assert (exported / "adapter" / "adapter_config.json").is_file()
    before, after = safetensors_of(world.student_dir), safetensors_of(exported)
    assert before.keys() == after.keys()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved), sorted(moved)


def safetensors_of(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    tensors = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_a_pair_padded_to_different_widths_trains(tmp_path, ray_cluster):
    """Qwen2's chat job, on one tokenizer with a teacher of 384 output rows and a student of 336:
    accepted, every check of the other architectures' jobs holds, and no id at or past the
    tokenizer's size is ever sampled (so none reaches the narrower model)."""
    world = build_chat_world(ROOT / "artifacts" / "chat", "qwen2", student_width=336)
    inputs, _, rows = run_and_check(world, tmp_path, "chat-padded", "loss.name=generalized_jsd")
    assert inputs.pair.widths == (384, 336) and inputs.pair.padded_apart
    limit = inputs.pair.vocab_size
    assert max(max(r) for r in rows["response_ids"].to_pylist() if r) < limit
