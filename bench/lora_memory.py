"""The learner's peak memory and step time with LoRA against full fine-tuning, on one student.

Both configurations run the real learner rank (``learner.learner_actor.LearnerWorker``, world
size 1, DeepSpeed ZeRO ``--zero-stage``, CPU fp32, AdamW) on the same student and the same
batch, each in a fresh subprocess, one after the other: ``full`` trains every weight, ``lora``
wraps the student with ``learner.lora`` (PEFT) and trains only the adapters. The student is a
Llama-architecture model built locally from a config (no download) and saved once, so both
load the same weights. Per configuration: the peak resident memory above the mark taken
after the imports (``ru_maxrss``: weights, gradients, optimiser state, DeepSpeed's buffers and
the step's activations, what one rank holds), the median seconds of the steps after the first
(which pays for DeepSpeed's warm-up), the trainable parameters, the loss after the last step,
and the median seconds of three weight exports to the object store's buckets (where a LoRA student pays
for its merge, W + (alpha / r) B @ A per targeted weight). Ratios are LoRA's over full's.

    python -m bench.lora_memory --out bench/results/lora_memory.json   (make bench-memory)
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("full", "lora")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_student(out: Path, args: argparse.Namespace) -> int:
    """A tied Llama-architecture student saved to ``out``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                      vocab_size=args.vocab, tie_word_embeddings=True, max_position_embeddings=1024,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_table(rows: int, prompt: int, response: int, vocab: int, k: int):
    """Buffer rows of random tokens (half on-policy) with a random top-k teacher, as an Arrow table."""
    import numpy as np
    import pyarrow as pa

    from services.buffer_schema import Row, rows_to_batch

    rng = np.random.default_rng(0)
    out = []
    for i in range(rows):
        lps = np.sort(np.log(rng.dirichlet(np.ones(k + 4), size=response)[:, :k]), axis=1)[:, ::-1]
        ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(response)])
        out.append(Row(sample_id=f"s{i}", prompt_id=i, source="student" if i % 2 else "teacher",
                       policy_version=0 if i % 2 else -1,
                       prompt_ids=rng.integers(3, vocab, prompt).astype(np.int32),
                       response_ids=rng.integers(3, vocab, response).astype(np.int32),
                       behavior_logprobs=-rng.random(response).astype(np.float32),
                       teacher_topk_ids=ids.astype(np.int32), teacher_topk_logprobs=lps.astype(np.float32),
                       teacher_tail_logmass=np.log(rng.random(response)).astype(np.float32),
                       finish_reason="length"))
    return pa.Table.from_batches([rows_to_batch(out)])


def run_one(config: str, student: str, args: argparse.Namespace) -> dict:
    """``args.steps`` learner steps of one configuration in this process."""
    import deepspeed  # noqa: F401  (imported before the mark: not the learner's memory)
    import peft  # noqa: F401
    import torch  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    from cluster.config import LearnerConfig
    from learner.learner_actor import LearnerSettings, LearnerSpec, LearnerWorker, LossSettings
    from learner.loss_params import parse_loss_params

    table = make_table(args.rows, args.prompt, args.response, args.vocab, args.k)
    base = _peak_mib()
    lora = {"r": args.r, "alpha": 2.0 * args.r, "target_modules": "all-linear"} if config == "lora" else None
    cfg = LearnerConfig(actors=1, zero_stage=args.zero_stage, lr=1e-4, micro_batch=args.rows, steps=args.steps,
                        threads=args.threads, lora=lora)
    with socket.socket() as s:
        s.bind(("", 0))
        master = ("127.0.0.1", s.getsockname()[1])
    loss = LossSettings("forward_kl", parse_loss_params("forward_kl", None), "topk", 1.0)
    worker = LearnerWorker(0, 1, master, LearnerSpec(student, LearnerSettings.of(cfg), loss, seed=0, pad_id=0))
    built = _peak_mib()
    out = [worker.train_step(table) for _ in range(args.steps)]
    peak = _peak_mib()
    pushes = []
    for _ in range(3):  # a single export's time swings on a shared machine: the median of three
        t0 = time.perf_counter()
        worker.export_weights("object_store", 64, "float32")
        pushes.append(time.perf_counter() - t0)
    push = statistics.median(pushes)
    module = worker.engine.module
    return {"config": config, "peak_mib": peak - base, "built_mib": built - base,
            "export_peak_mib": _peak_mib() - base,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "seconds_per_step": statistics.median(o["seconds"] for o in out[1:]),
            "first_step_seconds": out[0]["seconds"], "export_seconds": push, "last_loss": out[-1]["loss"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--r", type=int, default=16, help="learner.lora.r (alpha = 2r, all-linear)")
    ap.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/lora_memory.json")
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "STUDENT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


SHAPE_KEYS = ("hidden", "layers", "intermediate", "vocab", "r", "zero_stage", "rows", "prompt", "response", "k",
              "steps", "threads")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args)))
        return {}
    shape = [a for key in SHAPE_KEYS for a in (f"--{key.replace('_', '-')}", str(getattr(args, key)))]
    with tempfile.TemporaryDirectory(prefix="lora_memory_") as tmp:
        params = build_student(Path(tmp) / "student", args)
        rows = []
        for config in CONFIGS:
            done = subprocess.run([sys.executable, "-m", "bench.lora_memory", "--one", config, f"{tmp}/student",
                                   *shape], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{config:5s} peak +{r['peak_mib']:7.0f} MiB  trainable {r['trainable_params']:>12,d}  "
                  f"{r['seconds_per_step']:6.2f} s/step  export {r['export_seconds']:5.2f} s", flush=True)
    full, lora = rows
    ratios = {key: lora[key] / full[key] for key in ("peak_mib", "seconds_per_step", "trainable_params",
                                                    "export_seconds")}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"command": " ".join(["python -m bench.lora_memory", *(argv if argv is not None else sys.argv[1:])]),
              "commit": commit, "shape": {k: getattr(args, k) for k in SHAPE_KEYS}, "student_params": params,
              "machine": platform.platform(), "python": platform.python_version(), "rows": rows,
              "lora_over_full": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("LoRA / full: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    return result


if __name__ == "__main__":
    main()
