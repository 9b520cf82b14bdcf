"""TRL's GKDTrainer, timed: ``bench/speed_e2e.py`` runs this file in ``.venv-trl``.

It imports only the stdlib, torch, transformers, trl and datasets (through
``bench/trl_baseline.py``, whose trainer, settings and token check it reuses unchanged), never
ammd's packages. The arguments are ``trl_baseline.py``'s. The trainer is built exactly as the
quality benchmark builds it; the only addition is a count of the tokens each step trains on
(labels that are not -100: the response tokens and their end token, whether the batch came from
the dataset or from the student's own samples), read where the loss is computed. Nothing is
saved but ``OUT/trl_speed.json``: steps, transformers' ``train_runtime`` (the training loop
alone, without model loading), trained tokens, threads, the token check and versions.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import trl_baseline as tb  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def count_tokens(trainer: Any) -> list[int]:
    """Make ``trainer`` append each loss computation's trained-token count to the list returned."""
    counts: list[int] = []
    compute = trainer.compute_loss

    def counted(model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        counts.append(int((inputs["labels"] != -100).sum()))
        return compute(model, inputs, *args, **kwargs)

    trainer.compute_loss = counted
    return counts


def main(argv: list[str] | None = None) -> dict:
    args = tb.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.student)
    tok.chat_template = tb.CHAT_TEMPLATE
    rows = load_dataset("json", data_files=args.train, split="train",
                        cache_dir=str(out / "hf-datasets-cache")).select_columns(["prompt", "response"])
    trainer = tb.build_trainer(args, tok, rows, out)
    check = tb.check_tokens(trainer, args.method, tok, rows)
    counts = count_tokens(trainer)
    result = trainer.train()
    runtime = result.metrics["train_runtime"]
    record = {"method": args.method, "steps": trainer.state.global_step, "batch": args.batch,
              "train_runtime_s": runtime, "trained_tokens": sum(counts),
              "steps_per_s": trainer.state.global_step / runtime, "tokens_per_s": sum(counts) / runtime,
              "on_policy_steps": len(getattr(trainer, "on_policy", [])), "threads": torch.get_num_threads(),
              "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
              "token_check": {"rows_checked": check["rows_checked"], "equal": check["equal"]},
              "versions": tb._versions()}
    (out / "trl_speed.json").write_text(json.dumps(record, indent=1))
    for scratch in ("trainer", "hf-datasets-cache"):
        shutil.rmtree(out / scratch, ignore_errors=True)
    print(f"done: {record['steps']} steps in {runtime:.1f} s ({record['steps_per_s']:.3f} steps/s, "
          f"{record['tokens_per_s']:.0f} tokens/s)", flush=True)
    return record


if __name__ == "__main__":
    main()
