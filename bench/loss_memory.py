"""Peak memory and time of the chunked losses against the naive full-tensor computation.

Each (loss, teacher signal, variant) runs in a fresh subprocess: it builds the inputs, notes
its resident memory, runs forward + backward once, and reports the peak resident memory above
that mark (``ru_maxrss``), the wall time, the loss value and a fixed sample of the gradient.
``--device cuda`` measures the CUDA allocator's peak instead (not yet run on a GPU).
The chunked and naive runs of one loss get identical inputs (same seed), so their values and
gradients are compared exactly as numbers, side by side.

    python -m bench.loss_memory --out bench/results/loss_memory.json   (make bench-memory)
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from learner.losses import DEFAULT_CHUNK_SIZE

CASES = [("forward_kl", "topk"), ("reverse_kl", "topk"), ("generalized_jsd", "full")]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run_one(loss: str, signal: str, variant: str, positions: int, vocab: int, k: int, chunk: int,
            device: str = "cpu") -> dict:
    import torch
    from learner.losses import get_loss
    from learner.teacher_signal import TopKSignal, tail_logmass_from_topk

    torch.manual_seed(0)
    b = 8
    t = positions // b
    student = torch.randn(b, t, vocab) * 2
    student.requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool)
    if signal == "full":
        teacher = torch.randn(b, t, vocab) * 2
    else:
        lp = torch.log_softmax(torch.randn(b, t, 4 * k) * 2, -1)[..., :k]  # a valid top-k slice
        vals, _ = lp.sort(-1, descending=True)
        ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(64)])[torch.randint(0, 64, (b, t))]
        teacher = TopKSignal(ids, vals, tail_logmass_from_topk(vals))
    fn = get_loss(loss).fn
    kwargs = {"naive": True} if variant == "naive" else {"chunk_size": chunk}
    if device == "cuda":  # same inputs, moved; peak measured by the CUDA caching allocator
        student = student.detach().cuda().requires_grad_(True)
        mask = mask.cuda()
        teacher = teacher.cuda() if isinstance(teacher, torch.Tensor) else teacher.to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() // 1024
    else:
        base = _rss_kib()
    t0 = time.perf_counter()
    value = fn(student, teacher, mask, **kwargs)
    value.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() // 1024
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    sample = torch.randint(0, student.numel(), (4096,), generator=g)
    return {"loss": loss, "signal": signal, "variant": variant, "peak_extra_mib": (peak - base) / 1024,
            "seconds": seconds, "value": float(value),
            "grad_sample": student.grad.reshape(-1)[sample.to(student.device)].tolist(),
            "grad_bytes_mib": student.numel() * 4 / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE)
    ap.add_argument("--out", default="bench/results/loss_memory.json")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--one", nargs=3, metavar=("LOSS", "SIGNAL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.positions, args.vocab, args.k, args.chunk, args.device)))
        return
    rows = []
    for loss, signal in CASES:
        pair = {}
        for variant in ("naive", "chunked"):
            cmd = [sys.executable, "-m", "bench.loss_memory", "--one", loss, signal, variant,
                   "--positions", str(args.positions), "--vocab", str(args.vocab), "--k", str(args.k),
                   "--chunk", str(args.chunk), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            pair[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{loss:16s} {signal:5s} {variant:8s} peak +{pair[variant]['peak_extra_mib']:8.0f} MiB "
                  f"{pair[variant]['seconds']:6.2f} s", flush=True)
        n, c = pair["naive"], pair["chunked"]
        diff = max(abs(a - b) for a, b in zip(n["grad_sample"], c["grad_sample"]))
        scale = max(abs(a) for a in n["grad_sample"]) or 1.0
        rows.append({"loss": loss, "signal": signal, "naive_peak_mib": n["peak_extra_mib"],
                     "chunked_peak_mib": c["peak_extra_mib"], "memory_ratio": n["peak_extra_mib"] / c["peak_extra_mib"],
                     "naive_seconds": n["seconds"], "chunked_seconds": c["seconds"],
                     "value_naive": n["value"], "value_chunked": c["value"],
                     "value_rel_diff": abs(n["value"] - c["value"]) / max(abs(n["value"]), 1e-12),
                     "grad_max_abs_diff_over_max": diff / scale, "grad_buffer_mib": n["grad_bytes_mib"]})
    result = {"device": args.device, "positions": args.positions, "vocab": args.vocab, "k": args.k, "chunk": args.chunk,
              "machine": platform.platform(), "python": platform.python_version(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['loss']:16s} {r['signal']:5s} memory {r['memory_ratio']:.1f}x lower, "
              f"time {r['naive_seconds']:.1f}s -> {r['chunked_seconds']:.1f}s, value rel diff "
              f"{r['value_rel_diff']:.1e}, grad diff {r['grad_max_abs_diff_over_max']:.1e}")


if __name__ == "__main__":
    main()
