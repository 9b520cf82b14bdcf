"""Hugging Face TRL itself as a baseline: train the student with TRL's own trainers.

Runs in its own virtualenv (``bench/trl_runner.py`` builds ``.venv-trl`` and calls this file by
path), so it imports only the stdlib, torch, transformers, trl, datasets and accelerate, never
ammd's packages.

    .venv-trl/bin/python bench/trl_baseline.py --method gkd --student S --teacher T \
        --train train.jsonl --lr 1e-3 --steps 150 --batch 32 --max-new-tokens 20 \
        --temperature 1.0 --seed 0 --out OUT

Methods: ``sft`` = ``SFTTrainer`` on prompt/completion rows, loss on the completion only;
``gkd`` = ``GKDTrainer`` with lmbda 0.5, beta 0.5 (TRL's default mix); ``gkd-onpolicy`` =
``GKDTrainer`` with lmbda 1.0, beta 0.5. All share one budget: ``--steps`` optimiser steps of
``--batch`` rows, AdamW at ``--lr`` with linear decay to 0, no warm-up or weight decay,
gradient clipping at 1.0, TRL's own shuffling.

Contract: the trained student is saved at ``OUT`` (``save_pretrained`` of model and tokenizer)
and ``OUT/trl_run.json`` holds the method, its settings, timings, final loss, log history and
the token check. The training tokens equal ammd's (``<s> prompt`` from the tokenizer's default,
then the response without specials and ``</s>``); the script checks this before training and
exits non-zero if they differ.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

# GKD's collator renders rows through a chat template and tokenizes without special tokens, so
# the template itself supplies <s> and </s>: "<s> prompt" (+ " response </s>"), which a
# whitespace word-level tokenizer turns into exactly ammd's ids.
CHAT_TEMPLATE = (
    "{{ bos_token }} {{ messages[0]['content'] }}"
    "{% if messages | length > 1 %} {{ messages[1]['content'] }} {{ eos_token }}{% endif %}"
)
LMBDA = {"gkd": 0.5, "gkd-onpolicy": 1.0}
CHECK_ROWS = 64


def ammd_tokens(tok: Any, prompt: str, response: str) -> tuple[list[int], int]:
    """ammd's training ids for one row (cluster/data.py reference_rows) and the prompt length."""
    p = tok(prompt)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + r, len(p)


def common_config(args: argparse.Namespace, out: Path) -> dict:
    """The settings every method shares, so they differ only in their trainer and loss."""
    return dict(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=args.seed,
        # SFTConfig defaults bf16=True and gradient_checkpointing=True: both wrong for fp32 CPU.
        bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=min(10, args.steps),
        disable_tqdm=True, dataloader_num_workers=0,
    )


def build_trainer(args: argparse.Namespace, tok: Any, rows: Any, out: Path) -> Any:
    """TRL's trainer for ``args.method`` on ``rows`` ({"prompt", "response"}), not yet trained."""
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    if args.method == "sft":
        from trl import SFTConfig, SFTTrainer

        # A leading space keeps the word boundary; ending in </s> stops TRL's add_eos from
        # gluing another eos onto the last word.
        data = rows.map(lambda r: {"prompt": r["prompt"], "completion": f" {r['response']} {tok.eos_token}"},
                        remove_columns=rows.column_names)
        cfg = SFTConfig(**common_config(args, out), completion_only_loss=True, packing=False,
                        max_length=1024)
        return SFTTrainer(model=student, args=cfg, train_dataset=data, processing_class=tok)
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # Only a "messages" column: the collator would take a "prompt" column as the rendered prompt.
    data = rows.map(lambda r: {"messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]},
                    remove_columns=rows.column_names)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    cfg = GKDConfig(**common_config(args, out), lmbda=LMBDA[args.method], beta=0.5,
                    temperature=args.temperature, max_new_tokens=args.max_new_tokens, seq_kd=False)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                         processing_class=tok)
    _count_on_policy(trainer)
    return trainer


def _count_on_policy(trainer: Any) -> None:
    """Append each on-policy step's (sampled / dataset) label-count ratio to ``trainer.on_policy``.

    TRL flips one coin per batch (``random.random() <= lmbda``), and transformers divides the
    loss by the label count of the *collated dataset batch*, counted before the batch is swapped
    for the student's samples; the ratio shows how far that normalisation is off.
    """
    generate, trainer.on_policy = trainer.generate_on_policy_outputs, []

    def counted(model: Any, inputs: dict, generation_config: Any) -> Any:
        ids, mask, labels = generate(model, inputs, generation_config)
        dataset_items = int((inputs["labels"][:, 1:] != -100).sum())
        trainer.on_policy.append(int((labels[:, 1:] != -100).sum()) / max(dataset_items, 1))
        return ids, mask, labels

    trainer.generate_on_policy_outputs = counted


def check_tokens(trainer: Any, method: str, tok: Any, rows: Any) -> dict:
    """Compare the first rows' training ids and loss mask with ammd's; raise if any differ."""
    n = min(CHECK_ROWS, len(rows))
    want = [ammd_tokens(tok, rows[i]["prompt"], rows[i]["response"]) for i in range(n)]
    got = []
    if method == "sft":
        ds = trainer.train_dataset
        for i in range(n):
            # TRL turns completion_mask into labels (-100 on the prompt) and drops the mask.
            ids, lab = list(ds[i]["input_ids"]), list(ds[i]["labels"])
            plen = next(j for j, x in enumerate(lab) if x != -100)
            if lab[plen:] != ids[plen:] or any(x != -100 for x in lab[:plen]):
                raise SystemExit("token check: SFT labels are not the completion ids")
            got.append((ids, plen))
    else:
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        for ids, att, lab, pr, pm in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         batch["prompts"], batch["prompt_attention_mask"]):
            ids, lab = ids[att.bool()].tolist(), lab[att.bool()].tolist()  # drop the left padding
            plen = next(j for j, x in enumerate(lab) if x != -100)
            if lab[plen:] != ids[plen:] or pr[pm.bool()].tolist() != ids[:plen]:
                raise SystemExit("token check: GKD labels or prompts are not the response/prompt ids")
            got.append((ids, plen))
    bad = [i for i in range(n) if got[i] != want[i]]
    if bad:
        i = bad[0]
        raise SystemExit(f"token check: row {i} differs from ammd's tokens:\n TRL  {got[i]}\n ammd {want[i]}")
    ids, plen = got[0]
    return {"rows_checked": n, "equal": True, "example_ids": ids, "example_prompt_len": plen,
            "example_decoded": tok.decode(ids), "example_completion": tok.decode(ids[plen:])}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True, choices=["sft", *LMBDA])
    ap.add_argument("--student", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--train", required=True, help='JSONL of {"prompt", "response"} rows')
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="rows per optimiser step")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--temperature", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, save the student at ``--out`` and write ``--out/trl_run.json``; returns its content."""
    args = parse_args(argv)
    t0, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.student)
    tok.chat_template = CHAT_TEMPLATE
    rows = load_dataset("json", data_files=args.train, split="train",
                        cache_dir=str(out / "hf-datasets-cache")).select_columns(["prompt", "response"])
    trainer = build_trainer(args, tok, rows, out)
    check = check_tokens(trainer, args.method, tok, rows)
    print(f"token check: {check['rows_checked']} rows equal ammd's; e.g. {check['example_ids']} = "
          f"{check['example_decoded']!r}, loss on {check['example_completion']!r}", flush=True)
    t1 = time.time()
    result = trainer.train()
    train_s = time.time() - t1
    trainer.model.save_pretrained(out)
    AutoTokenizer.from_pretrained(args.student).save_pretrained(out)  # as given, no chat template
    for scratch in ("trainer", "hf-datasets-cache"):  # TRL's output_dir (empty) and datasets' cache
        shutil.rmtree(out / scratch, ignore_errors=True)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    record = {
        "method": args.method, "lr": args.lr, "steps": trainer.state.global_step, "batch": args.batch,
        "seed": args.seed, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
        "lmbda": LMBDA.get(args.method), "beta": 0.5 if args.method in LMBDA else None,
        "rows": len(rows), "wall_seconds": round(time.time() - t0, 2), "train_seconds": round(train_s, 2),
        # the training loop alone (transformers' train_runtime), without set-up or saving
        "steps_per_second": round(trainer.state.global_step / result.metrics["train_runtime"], 3),
        "trainer_metrics": result.metrics,
        "final_loss": losses[-1] if losses else None, "mean_train_loss": result.training_loss,
        "on_policy_steps": len(getattr(trainer, "on_policy", [])),
        # mean of (sampled label count / dataset label count the loss was divided by)
        "on_policy_label_ratio": (round(sum(trainer.on_policy) / len(trainer.on_policy), 4)
                                  if getattr(trainer, "on_policy", None) else None),
        "log_history": history, "token_check": check,
        "versions": _versions(), "threads": torch.get_num_threads(),
    }
    (out / "trl_run.json").write_text(json.dumps(record, indent=1))
    print(f"done: {record['steps']} steps, {record['wall_seconds']:.1f} s in all "
          f"({record['steps_per_second']} steps/s), final loss {record['final_loss']}", flush=True)
    return record


def _versions() -> dict[str, str]:
    import accelerate
    import datasets
    import transformers
    import trl

    return {m.__name__: m.__version__ for m in (torch, transformers, trl, datasets, accelerate)}


if __name__ == "__main__":
    main()
