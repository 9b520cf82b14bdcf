"""One GPU check of the learner and rollout code on CUDA, for a lent GPU machine (issue #13).

What it runs, on one GPU, with a small Llama-architecture pair built here (no download):
1. rollouts: the teacher and student engines (``engine: hf``, transformers on CUDA, bf16) sample
   and score rows into the Arrow schema the buffer holds;
2. learner: ``LearnerWorker`` (DeepSpeed ZeRO-2, NCCL, bf16) trains on those rows with forward
   KL and with AMM (chi2 without the policy gradient, and the default bounded class); per loss:
   seconds per step, tokens/s, peak GPU memory, and whether the loss fell;
3. weight push: the learner's export (object store buckets, bf16) loaded into the student
   engine; its greedy decodes against the learner module's own greedy decodes.

What it cannot run there: the GPU image has no Ray and no vLLM, and their wheels are over what
a call may carry (64 MiB). The classes run in one process instead of as Ray actors, so only
the ``ray.method`` decorator and node-address helper are stood in for when Ray is missing
(they do nothing on a method call); with one GPU, NCCL cannot form a two-rank group.

    python -m bench.gpu_check --out gpu_check.json                       # the path check
    for i in 0 1 2; do python -m bench.gpu_check --preset vocab128k --loss $i --out 128k-$i.json; done
                                        # AMM heads' memory at V=131072, one process per loss
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import types
from pathlib import Path


DEVICE, DTYPE = "cuda", "bfloat16"


def _ray_stand_in() -> None:
    """Only if Ray is not installed: the decorator the actor classes use at import time."""
    try:
        import ray  # noqa: F401
    except ImportError:
        ray = types.ModuleType("ray")
        ray.method = lambda **_: (lambda f: f)
        ray.util = types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1")
        sys.modules["ray"] = ray


# (vocab, (teacher hidden, layers, heads), (student hidden, layers, heads)) per --preset
PRESETS = {"small": (32000, (512, 8, 8), (256, 4, 4)),          # ~45M teacher, ~10M student
           "vocab128k": (131072, (2048, 2, 16), (2048, 1, 16))}  # AMM's heads at a real vocabulary
LOSSES = {"small": [{"name": "forward_kl"},
                    {"name": "amm", "params": {"adversary_class": "chi2", "pg_coef": 0}},
                    {"name": "amm", "params": {"adversary_class": "bounded", "pg_coef": 0.2}}],  # the paper's class, ammd's settings
          "vocab128k": [{"name": "forward_kl"},
                        {"name": "amm", "params": {"adversary_class": "chi2", "pg_coef": 0}},
                        {"name": "amm", "params": {"adversary_class": "chi2", "pg_coef": 0,
                                                   "head": "logratio_lowrank"}}]}


def build_pair(root: Path, preset: str = "small") -> tuple[str, str]:
    """A Llama-architecture teacher and student of ``preset`` (seed 0), saved as HF model dirs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, *sizes = PRESETS[preset]
    dirs = []
    for name, (hidden, layers, heads) in zip(("teacher", "student"), sizes):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        path = root / name
        LlamaForCausalLM(cfg).save_pretrained(path)
        dirs.append(str(path))
    return dirs[0], dirs[1]


def make_rows(teacher: str, student: str, prompts: int, tokens: int):
    """Half teacher samples (off-policy), half student samples scored by the teacher."""
    import numpy as np
    import pyarrow as pa
    from rollout.worker import RolloutSpec, RolloutWorker
    from rollout.engine import EngineOptions

    opts = dict(max_response_tokens=tokens, temperature=1.0, topk=16, stop_token_ids=(2,),
                options=EngineOptions(device=DEVICE, dtype=DTYPE, seed=0))
    t = RolloutWorker(RolloutSpec("teacher", "hf", teacher, **opts))
    s = RolloutWorker(RolloutSpec("student", "hf", student, **opts))
    rng = np.random.default_rng(0)
    batch = [(i, rng.integers(3, 32000, 12).tolist()) for i in range(prompts)]  # ids < every preset's vocab
    t0 = time.time()
    off = t.sample_rows(batch[: prompts // 2])
    on = t.score_rows(s.sample(batch[prompts // 2:]))
    return pa.Table.from_batches([off, on]), s, time.time() - t0


def train(student: str, loss: dict, table, steps: int) -> tuple[dict, object]:
    """``steps`` learner steps on ``table`` (same rows each step): losses, timing, peak memory."""
    import torch
    from cluster.config import LearnerConfig
    from learner.learner_actor import LearnerSettings, LearnerSpec, LearnerWorker, LossSettings
    from learner.loss_params import parse_loss_params

    port = socket.socket(); port.bind(("", 0)); master = ("127.0.0.1", port.getsockname()[1]); port.close()
    cfg = LearnerConfig(actors=1, device=DEVICE, precision="bf16" if DEVICE == "cuda" else "fp32",
                        zero_stage=2, lr=1e-3, micro_batch=table.num_rows, steps=steps, threads=4)
    objective = LossSettings(loss["name"], parse_loss_params(loss["name"], loss.get("params")), "topk", 1.0)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    worker = LearnerWorker(0, 1, master, LearnerSpec(student, LearnerSettings.of(cfg), objective, seed=0, pad_id=0))
    out = [worker.train_step(table) for _ in range(steps)]
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    losses = [o["loss"] for o in out]
    warm = out[2:]  # the first steps pay for CUDA/DeepSpeed warm-up
    return {"loss": loss, "first_loss": losses[0], "last_loss": losses[-1],
            "all_finite": all(l == l and abs(l) != float("inf") for l in losses),
            "loss_fell": sum(losses[-3:]) < sum(losses[:3]),
            "seconds_per_step": sum(o["seconds"] for o in warm) / len(warm),
            "tokens_per_s": sum(o["tokens"] for o in warm) / sum(o["seconds"] for o in warm),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if DEVICE == "cuda" else None,
            "backend": worker.ready()["backend"]}, worker


def push_and_decode(worker, student_actor, prompts: list[list[int]]) -> dict:
    """The learner's weights into the student engine; greedy decodes compared with the learner's."""
    import torch

    t0 = time.time()
    payload = worker.export_weights("object_store", 64, DTYPE)
    student_actor.load_weights(payload, 1)
    seconds = time.time() - t0
    engine_out = student_actor.greedy(prompts)
    module = worker.engine.module.eval()
    mine = []
    with torch.no_grad():
        for p in prompts:
            ids = module.generate(torch.tensor([p], device=DEVICE), max_new_tokens=len(engine_out[0]) or 8,
                                  do_sample=False, eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
            mine.append(ids[: ids.index(2) + 1] if 2 in ids else ids)
    same = sum(a == b for a, b in zip(engine_out, mine))
    return {"push_seconds": seconds, "greedy_equal": f"{same}/{len(prompts)}",
            "payload_mib": sum(b.nbytes for b in payload) / 2**20}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--loss", type=int, default=None,
                    help="run only this entry of the preset's losses: one process per loss, so a "
                         "peak-memory figure holds nothing an earlier learner left allocated")
    args = ap.parse_args(argv)
    _ray_stand_in()
    import gc

    import torch

    global DEVICE, DTYPE
    if not torch.cuda.is_available():  # a dry run of the same code on CPU (fp32)
        DEVICE, DTYPE = "cpu", "float32"
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__}
    teacher, student = build_pair(Path("/tmp/gpu_check_models") / args.preset, args.preset)
    table, student_actor, rollout_s = make_rows(teacher, student, args.prompts, args.tokens)
    result["rollout"] = {"rows": table.num_rows, "seconds": rollout_s}
    print(json.dumps(result), flush=True)
    result["preset"], result["train"], worker = args.preset, [], None
    losses = LOSSES[args.preset] if args.loss is None else [LOSSES[args.preset][args.loss]]
    for loss in losses:
        worker = None  # free the previous learner before measuring the next one's peak
        gc.collect()
        stats, worker = train(student, loss, table, args.steps)
        result["train"].append(stats)
        print(json.dumps(stats), flush=True)
    prompts = table.column("prompt_ids").to_pylist()[:6]
    result["push"] = push_and_decode(worker, student_actor, prompts)
    print(json.dumps(result["push"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
