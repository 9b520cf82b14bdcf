"""Peak memory of one learner step: forward KL against AMM with each adversary head.

AMM's two adversary heads are replicated on every learner rank, outside ZeRO, with their Adam
state, so a head that grows as hidden x V costs per-rank memory that a student's own weights
(partitioned by ZeRO) do not. This measures it at a real vocabulary (issue #13).

Each configuration runs in a fresh subprocess on CPU, fp32: it builds a small Llama-architecture
student locally from a config (no download; hidden 2048, a 131072-token vocabulary tied to the
input embedding, as Llama 3.2 1B has, and few layers), its Adam optimiser and the objective
(``learner.objective.make_objective``), then takes one learner step as the learner does:
forward (with hidden states for AMM), the objective's loss (AMM's adversary ascent inside
it), backward, Adam step. It reports the peak resident memory above the mark taken after the
imports (``ru_maxrss``): weights, gradients, both optimisers' states and the step's
activations, what one rank holds without ZeRO. The teacher signal is a random top-k.

    python -m bench.amm_memory --out bench/results/amm_memory.json
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

# (name, loss config): forward KL, then AMM with its default head and with each head kind.
CONFIGS = {
    "forward_kl": {"name": "forward_kl"},
    "amm_default": {"name": "amm", "params": {}},  # whatever head learner/amm.py defaults to
    "amm_logratio": {"name": "amm", "params": {"head": "logratio"}},
    "amm_lowrank": {"name": "amm", "params": {"head": "lowrank"}},
    "amm_logratio_lowrank": {"name": "amm", "params": {"head": "logratio_lowrank"}},
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_batch(rows: int, prompt: int, response: int, vocab: int, k: int):
    """A LearnerBatch of random tokens, half of it on-policy, with a random top-k teacher."""
    import torch
    from learner.batch import LearnerBatch
    from learner.teacher_signal import TopKSignal, tail_logmass_from_topk

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, prompt + response), generator=g)
    lp = torch.log_softmax(torch.randn(rows, response, 4 * k, generator=g) * 2, -1)[..., :k]
    vals, _ = lp.sort(-1, descending=True)
    top = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows * response)])
    teacher = TopKSignal(top.view(rows, response, k), vals, tail_logmass_from_topk(vals))
    on = torch.arange(rows) % 2 == 0
    return LearnerBatch(ids, torch.ones_like(ids), torch.arange(prompt + response).expand(rows, -1), prompt,
                        ids[:, prompt:], torch.ones(rows, response, dtype=torch.bool),
                        torch.full((rows, response), -5.0), on, torch.zeros(rows), teacher)


def make_student(hidden: int, vocab: int, layers: int, intermediate: int):
    """A Llama-architecture student from a config (Llama 3.2 1B's shapes, fewer layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=vocab,
                      tie_word_embeddings=True, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).train()


def run_one(config: str, args: argparse.Namespace) -> dict:
    """One configuration's learner step in this process; the peak above the imports' mark."""
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401  (loaded before the mark: not the step's)
    from learner.objective import make_objective

    torch.manual_seed(0)
    base = _rss_mib()
    model = make_student(args.hidden, args.vocab, args.layers, args.intermediate)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5, foreach=False)
    loss_cfg = json.loads(json.dumps(CONFIGS[config]))
    if loss_cfg["name"] == "amm":
        loss_cfg["params"]["head_rank"] = args.rank
    objective = make_objective(loss_cfg, hidden_size=args.hidden, vocab_size=args.vocab, steps=10)
    batch = make_batch(args.rows, args.prompt, args.response, args.vocab, args.k)
    built = _rss_mib()
    t0 = time.perf_counter()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                output_hidden_states=objective.needs_hidden)
    loss, _ = objective.loss(out, batch)
    loss.backward()
    optimizer.step()
    objective.after_student_step(out, batch)
    seconds = time.perf_counter() - t0
    heads = getattr(objective, "heads", ())
    return {"config": config, "peak_mib": _peak_mib() - base, "built_mib": built - base,
            "student_params": sum(p.numel() for p in model.parameters()),
            "head_params": sum(p.numel() for h in heads for p in h.parameters()),
            "seconds": seconds, "loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=64, help="loss.params.head_rank of the low-rank heads")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--response", type=int, default=32)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--out", default="bench/results/amm_memory.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    shape = ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--layers", str(args.layers),
             "--intermediate", str(args.intermediate), "--rank", str(args.rank), "--rows", str(args.rows),
             "--prompt", str(args.prompt), "--response", str(args.response), "--k", str(args.k)]
    rows = []
    for config in args.configs:
        out = subprocess.run([sys.executable, "-m", "bench.amm_memory", "--one", config, *shape],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{config:22s} peak +{rows[-1]['peak_mib']:8.0f} MiB  head params {rows[-1]['head_params']:>11,d}  "
              f"{rows[-1]['seconds']:6.1f} s", flush=True)
    fkl = next((r["peak_mib"] for r in rows if r["config"] == "forward_kl"), None)
    for r in rows:
        r["ratio_to_forward_kl"] = r["peak_mib"] / fkl if fkl else None
        r["extra_mib_vs_forward_kl"] = r["peak_mib"] - fkl if fkl else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    shape_args = {k: v for k, v in vars(args).items() if k not in ("one", "out", "configs")}
    result = {"command": " ".join(["python -m bench.amm_memory", *sys.argv[1:]]), "commit": commit,
              "shape": shape_args, "machine": platform.platform(), "python": platform.python_version(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['config']:22s} {r['ratio_to_forward_kl']:.2f}x forward KL's peak")


if __name__ == "__main__":
    main()
