"""Building the toy world once and caching it: tokenizer, teacher, student and data splits.

``build_toy_world(root, task, seed)`` returns a ``ToyWorld`` of ordinary files (two HF model
directories and JSONL splits). The result lives under ``root/<task>-<recipe hash>``; the hash
covers everything that shapes the output, so changing the recipe builds a new world and an
unchanged one is reused. A build writes into a temporary directory and renames it into place,
so a crashed or concurrent build never leaves a half-written world behind.

The teacher is trained long enough to be nearly perfect; the student is several times smaller
and trained briefly, so it starts clearly worse and distillation has room to show.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from tasks.base import Example, get_task
from tasks.scoring import score
from tasks.tokenizer import build_tokenizer
from tasks.toy_models import STUDENT, TEACHER, greedy_decode, make_llama, train_sft

RECIPE_VERSION = 1
SPLITS = {"train": 20000, "eval": 200, "test": 300}
TEACHER_STEPS, STUDENT_STEPS, BATCH, LR = 1200, 100, 64, 3e-3


@dataclass
class ToyWorld:
    root: Path
    teacher_dir: Path
    student_dir: Path
    train_path: Path
    eval_path: Path
    test_path: Path
    metric: str
    scores: dict          # {"teacher": float, "student": float} on the test split


def _code_digest(task) -> str:
    """A hash of the code that shapes a world: the task's module, tokenizer and models."""
    import inspect

    from tasks import tokenizer, toy_models
    sources = [inspect.getsource(inspect.getmodule(type(task))), inspect.getsource(tokenizer),
               inspect.getsource(toy_models)]
    return hashlib.sha256("\n".join(sources).encode()).hexdigest()[:12]


def _recipe(task: str, seed: int) -> dict:
    # Editing a task's generator or the models changes the code digest and so the cache key.
    return {"version": RECIPE_VERSION, "task": task, "seed": seed, "splits": SPLITS,
            "code": _code_digest(get_task(task)),
            "teacher": asdict(TEACHER), "student": asdict(STUDENT),
            "steps": [TEACHER_STEPS, STUDENT_STEPS], "batch": BATCH, "lr": LR}


def _world(path: Path, metric: str) -> ToyWorld:
    info = json.loads((path / "world.json").read_text())
    return ToyWorld(path, path / "teacher", path / "student", path / "train.jsonl",
                    path / "eval.jsonl", path / "test.jsonl", metric, info["scores"])


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    with path.open("w") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex.prompt, "response": ex.response}) + "\n")


def build_toy_world(root: Path, task: str = "sort", seed: int = 0, log=print) -> ToyWorld:
    """The cached toy world for ``task`` and ``seed`` under ``root`` (built on first use)."""
    spec = get_task(task)
    recipe = _recipe(task, seed)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    final = Path(root) / f"{task}-{digest}"
    if (final / "world.json").exists():
        return _world(final, spec.metric)
    build_atomically(final, lambda tmp: _build(tmp, spec, recipe, seed, log))
    return _world(final, spec.metric)


def build_atomically(final: Path, build: Callable[[Path], None]) -> None:
    """``build(tmp)`` into a fresh sibling of ``final``, then rename it to ``final``, so a
    reader never sees a half-built directory. A concurrent build that finished first wins."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # a concurrent build finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build(out: Path, spec, recipe: dict, seed: int, log) -> None:
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        tok = build_tokenizer(spec.words())
        splits = spec.splits(seed, SPLITS["train"], SPLITS["eval"], SPLITS["test"])
        for name, rows in splits.items():
            _write_jsonl(out / f"{name}.jsonl", rows)
        prompts = [ex.prompt for ex in splits["test"]]
        refs = [ex.response for ex in splits["test"]]
        max_new = 2 + max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
        scores = {}
        for role, shape, steps, model_seed in (("teacher", TEACHER, TEACHER_STEPS, seed + 1),
                                               ("student", STUDENT, STUDENT_STEPS, seed + 2)):
            log(f"toy world: training the {role} ({steps} steps)")
            model = make_llama(len(tok), shape, model_seed)
            train_sft(model, tok, splits["train"], steps, BATCH, LR, model_seed)
            scores[role] = score(spec.metric, greedy_decode(model, tok, prompts, max_new), refs)
            model.save_pretrained(out / role)
            tok.save_pretrained(out / role)
        (out / "world.json").write_text(json.dumps(
            {"recipe": recipe, "scores": scores, "metric": spec.metric,
             "build_seconds": round(time.time() - t0, 1)}, indent=2))
        log(f"toy world: {spec.metric} teacher {scores['teacher']:.3f}, student "
            f"{scores['student']:.3f} on {len(prompts)} test prompts ({time.time() - t0:.0f} s)")
    finally:
        torch.set_num_threads(threads)
