"""The speed benchmark's models and data, built locally and deterministically, cached.

``build_world(sizes)`` returns a ``SpeedWorld``: Llama-architecture Hugging Face model
directories (``LlamaForCausalLM`` with a fixed seed, randomly initialised: speed does not need
a trained model) sharing one word-level tokenizer, plus JSONL prompt/response files. The
realistic shape has a 32,000-token vocabulary: a ~20M-parameter student, a ~100M teacher, and
a ~300M model that only the weight-push part loads (as a "student"). Each directory lives under
``artifacts/speed/<name>-<hash of its recipe>``; a build writes a temporary directory and renames
it into place, as ``tasks/build.py`` does, so an unchanged recipe is reused and a crashed build
leaves nothing half-written.

The tokenizer is ``tasks.tokenizer.build_tokenizer`` over generated words ``w0 w1 ...`` (ids 0-3
are ``<pad> <s> </s> <unk>``), so every text is whitespace-separated words, every id is below the
vocabulary size, and TRL's chat-template tokens equal ammd's (bench/trl_baseline.py checks it).

``pick_dtype`` decides bf16 or fp32 for the rollout engines from the CPU's bf16 features and a
bf16 matmul timed against an fp32 one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks.build import build_atomically
from tasks.toy_models import ModelShape, make_llama
from tasks.tokenizer import SPECIALS, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "artifacts" / "speed"
RECIPE_VERSION = 1
MAX_POSITIONS = 128


@dataclass(frozen=True)
class Sizes:
    """Every shape the benchmark builds: model shapes by name, one vocabulary, the data."""

    vocab: int
    models: dict            # name -> ModelShape; "student" and "teacher" are the pair
    prompt_words: tuple     # (min, max) words per prompt
    response_words: tuple   # (min, max) words per dataset response
    train_rows: int
    eval_rows: int


# head size 64 everywhere (hidden / heads): vLLM's CPU attention supports it.
REALISTIC = Sizes(32000, {"student": ModelShape(hidden=256, layers=4, heads=4, mlp=704),       # ~20M
                          "teacher": ModelShape(hidden=768, layers=8, heads=12, mlp=2048),     # ~106M
                          "push-300M": ModelShape(hidden=1024, layers=18, heads=16, mlp=2816)},  # ~297M
                  (8, 16), (8, 24), 2000, 16)
SMOKE = Sizes(512, {"student": ModelShape(hidden=64, layers=1, heads=2, mlp=128),
                    "teacher": ModelShape(hidden=128, layers=2, heads=4, mlp=256)},
              (4, 8), (2, 8), 200, 4)


@dataclass
class SpeedWorld:
    models: dict[str, Path]     # name -> HF model directory (with the tokenizer)
    params: dict[str, int]      # name -> parameter count
    train_path: Path
    eval_path: Path
    vocab: int

    @property
    def student(self) -> Path:
        return self.models["student"]

    @property
    def teacher(self) -> Path:
        return self.models["teacher"]


def _words(vocab: int) -> list[str]:
    return [f"w{i}" for i in range(vocab - len(SPECIALS))]


def _digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _cached(name: str, recipe: dict, build: Callable[[Path], None]) -> Path:
    """``CACHE/<name>-<digest>``, built by ``build(tmp_dir)`` on first use (atomic rename)."""
    final = CACHE / f"{name}-{_digest(recipe)}"
    if (final / "recipe.json").exists():
        return final

    def build_with_recipe(tmp: Path) -> None:
        build(tmp)
        (tmp / "recipe.json").write_text(json.dumps(recipe, indent=1))
    build_atomically(final, build_with_recipe)
    return final


def build_model(name: str, shape: ModelShape, vocab: int, seed: int, log: Callable[[str], None] = print) -> Path:
    """A random ``LlamaForCausalLM`` of ``shape`` (untied head) with the word tokenizer, cached."""
    recipe = {"version": RECIPE_VERSION, "kind": "model", "shape": asdict(shape), "vocab": vocab,
              "seed": seed, "max_positions": MAX_POSITIONS}

    def build(out: Path) -> None:
        t0 = time.time()
        model = make_llama(vocab, shape, seed, max_positions=MAX_POSITIONS)
        model.save_pretrained(out)
        build_tokenizer(_words(vocab)).save_pretrained(out)
        n = sum(p.numel() for p in model.parameters())
        (out / "params.json").write_text(json.dumps({"params": n}))
        log(f"speed models: built {name} ({n / 1e6:.1f}M parameters) in {time.time() - t0:.0f} s")

    return _cached(name, recipe, build)


def build_data(sizes: Sizes, seed: int) -> Path:
    """train.jsonl and eval.jsonl of random word prompts and responses (lengths uniform in the
    ``sizes`` ranges), cached."""
    recipe = {"version": RECIPE_VERSION, "kind": "data", "vocab": sizes.vocab, "seed": seed,
              "prompt_words": list(sizes.prompt_words), "response_words": list(sizes.response_words),
              "rows": [sizes.train_rows, sizes.eval_rows]}

    def build(out: Path) -> None:
        rng, words = np.random.default_rng(seed), _words(sizes.vocab)

        def text(lo_hi: tuple) -> str:
            return " ".join(words[i] for i in rng.integers(0, len(words), rng.integers(lo_hi[0], lo_hi[1] + 1)))

        for split, n in (("train", sizes.train_rows), ("eval", sizes.eval_rows)):
            with (out / f"{split}.jsonl").open("w") as f:
                for _ in range(n):
                    f.write(json.dumps({"prompt": text(sizes.prompt_words),
                                        "response": text(sizes.response_words)}) + "\n")

    return _cached("data", recipe, build)


def build_world(sizes: Sizes, seed: int = 0, log: Callable[[str], None] = print) -> SpeedWorld:
    """Every model of ``sizes`` and the data (each model seeded ``seed`` + its index)."""
    models = {name: build_model(name, shape, sizes.vocab, seed + i, log)
              for i, (name, shape) in enumerate(sizes.models.items())}
    params = {name: json.loads((d / "params.json").read_text())["params"] for name, d in models.items()}
    data = build_data(sizes, seed)
    return SpeedWorld(models, params, data / "train.jsonl", data / "eval.jsonl", sizes.vocab)


def _matmul_seconds(n: int = 512, reps: int = 5) -> dict[torch.dtype, float]:
    """Best time of an n x n matmul per dtype, the two dtypes alternating (so that a change in
    the machine's load hits both alike)."""
    dtypes = (torch.float32, torch.bfloat16)
    mats = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in dtypes}
    best = dict.fromkeys(dtypes, float("inf"))
    for i in range(reps + 1):
        for dt, (a, b) in mats.items():
            t0 = time.perf_counter()
            a @ b
            if i:  # the first round is a warm-up
                best[dt] = min(best[dt], time.perf_counter() - t0)
    return best


def pick_dtype() -> dict:
    """bf16 for the rollout engines where this CPU computes in bf16 natively (AVX512-BF16 or AMX)
    and a bf16 matmul is at least as fast as an fp32 one; fp32 otherwise. Returns the choice,
    the CPU's features, the timings and why."""
    native = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx": torch.cpu._is_amx_tile_supported()}
    times = _matmul_seconds()
    fp32, bf16 = times[torch.float32], times[torch.bfloat16]
    use_bf16 = any(native.values()) and bf16 <= fp32
    why = (f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, AVX512-BF16 "
           f"{'yes' if native['avx512_bf16'] else 'no'}, AMX {'yes' if native['amx'] else 'no'}; a 512x512 "
           f"matmul took {bf16 * 1e3:.2f} ms in bf16 against {fp32 * 1e3:.2f} ms in fp32")
    return {"dtype": "bfloat16" if use_bf16 else "float32", "cpu_features": native,
            "matmul_ms": {"float32": round(fp32 * 1e3, 3), "bfloat16": round(bf16 * 1e3, 3)},
            "reason": f"{why}: " + ("bf16" if use_bf16 else "fp32, bf16 being slower here" if any(native.values())
                                    else "fp32, as this CPU has no native bf16")}
