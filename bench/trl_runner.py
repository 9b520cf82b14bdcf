"""Run Hugging Face TRL's own trainers as baselines, from ammd's venv, in a venv of their own.

TRL is not a dependency of ammd: its pins (transformers, accelerate, datasets) differ from
ammd's, so ``ensure_trl_venv`` builds ``.venv-trl`` on first use and ``run_trl`` runs
``bench/trl_baseline.py`` there as a subprocess. The trained student comes back as an HF model
directory; ``load_named_weights`` reads it in ammd's venv as the ``(name, fp32 tensor)`` list
that ammd's learner exports, so the bench can push it into the vLLM student actor and score it
with the same greedy decoding as every ammd method.

    from bench.trl_runner import TRL_METHODS, run_trl, load_named_weights
    run = run_trl("gkd", student=..., teacher=..., train=..., lr=1e-3, steps=150, batch=32,
                  max_new_tokens=20, temperature=1.0, seed=0, out=Path("runs/trl-gkd"))
    named = load_named_weights(run["model_dir"])
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"
SCRIPT = ROOT / "bench" / "trl_baseline.py"
# Measured to install and run together on CPU (shared/notes/PEERS.md). torch goes in first and
# stays pinned in the second install, so resolving trl can never swap it for another build.
TORCH_PIN = "torch==2.13.0"
TRL_PINS = ("trl==1.16.0", "transformers==5.24.0", "accelerate==1.15.0", "datasets==5.2.0")

# table label -> bench/trl_baseline.py --method
TRL_METHODS: dict[str, str] = {
    "TRL SFTTrainer": "sft",
    "TRL GKDTrainer (lambda 0.5, beta 0.5)": "gkd",
    "TRL GKDTrainer (on-policy, lambda 1)": "gkd-onpolicy",
}

_ENV = {"HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "", "HF_DATASETS_OFFLINE": "1"}


def _python() -> Path:
    return TRL_VENV / "bin" / "python"


def ensure_trl_venv(log: Callable[[str], None] = print) -> Path:
    """The TRL venv's python, building ``.venv-trl`` first if it is missing or has other pins.

    Idempotent and instant once built (a stamp file records the pins). Raises RuntimeError with
    the tail of pip's output if the installation fails; the stamp is then not written, so the
    next call tries again.
    """
    want, stamp = "\n".join((TORCH_PIN, *TRL_PINS)), TRL_VENV / ".installed"
    if stamp.exists() and stamp.read_text() == want and _python().exists():
        return _python()
    log(f"building {TRL_VENV} ({', '.join((TORCH_PIN, *TRL_PINS))}); a few minutes")
    stamp.unlink(missing_ok=True)
    install_log = ROOT / ".cache" / "trl-venv-install.log"
    install_log.parent.mkdir(parents=True, exist_ok=True)
    py = str(_python())
    # sys.executable: the interpreter ammd already runs on, so the same wheels fit.
    steps = [[sys.executable, "-m", "venv", str(TRL_VENV)],
             [py, "-m", "pip", "install", "-q", "-U", "pip"],
             [py, "-m", "pip", "install", "-q", TORCH_PIN],
             [py, "-m", "pip", "install", "-q", TORCH_PIN, *TRL_PINS],
             [py, "-c", "import torch, trl, transformers, datasets, accelerate; "
                        "from trl.experimental.gkd import GKDTrainer; print(torch.__version__)"]]
    with install_log.open("w") as f:
        for cmd in steps:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}).returncode
            if rc != 0:
                tail = "".join(install_log.read_text().splitlines(keepends=True)[-30:])
                raise RuntimeError(f"building {TRL_VENV} failed at `{' '.join(cmd)}` (exit {rc}); "
                                   f"full log {install_log}:\n{tail}")
    stamp.write_text(want)
    log(f"{TRL_VENV} ready")
    return _python()


def run_trl(method: str, *, student: str, teacher: str, train: str, lr: float, steps: int,
            batch: int, max_new_tokens: int, temperature: float, seed: int, out: Path,
            log: Callable[[str], None] = print, threads: int = 1) -> dict[str, Any]:
    """Train the student with TRL ``method`` (a value of ``TRL_METHODS``) in the TRL venv.

    The final student is saved at ``out`` (an HF model directory). Returns the script's
    ``trl_run.json`` plus ``"model_dir": str(out)``. Raises RuntimeError with the tail of the
    script's output (all of it is kept in ``out/trl_stdout.log``) if it fails.

    ``threads`` sets OMP_NUM_THREADS. The default 1 matches ammd's learner (``learner.threads``);
    on 2 cores that other work also uses, 2 threads ran 10-50x slower than 1 (OpenMP barriers
    wait on a descheduled thread), with identical results.
    """
    if method not in TRL_METHODS.values():
        raise ValueError(f"unknown TRL method {method!r}; choose from {sorted(TRL_METHODS.values())}")
    py = ensure_trl_venv(log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trl_run.json").unlink(missing_ok=True)  # never return a stale run's record
    cmd = [str(py), str(SCRIPT), "--method", method, "--student", str(student), "--teacher", str(teacher),
           "--train", str(train), "--lr", repr(lr), "--steps", str(steps), "--batch", str(batch),
           "--max-new-tokens", str(max_new_tokens), "--temperature", repr(temperature),
           "--seed", str(seed), "--out", str(out)]
    # ammd's PYTHONPATH or venv must not leak into TRL's interpreter.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(_ENV, OMP_NUM_THREADS=str(threads))
    tail: deque[str] = deque(maxlen=40)
    with (out / "trl_stdout.log").open("w") as f, subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            f.write(line)
            tail.append(line)
            if line.startswith(("token check", "done:", "{'loss'")):
                log(f"TRL {method}: {line.rstrip()}")
        rc = proc.wait()
    if rc != 0 or not (out / "trl_run.json").exists():
        raise RuntimeError(f"TRL {method} failed (exit {rc}); log {out / 'trl_stdout.log'}:\n{''.join(tail)}")
    return {**json.loads((out / "trl_run.json").read_text()), "model_dir": str(out)}


def load_named_weights(model_dir: str | Path) -> list[tuple[str, Any]]:
    """The saved model's weights as ``[(name, fp32 torch.Tensor)]`` in ``named_parameters`` order.

    Names and order are those of ``AutoModelForCausalLM.from_config(config).named_parameters()``
    (what ammd's learner exports), so a tied model yields no ``lm_head.weight`` and an untied
    one does. Raises ValueError if a parameter is missing from the files or has another shape.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))  # one file, or the shards of a large model
    if not files:
        raise ValueError(f"{model_dir} holds no *.safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    with torch.device("meta"):  # names and shapes only, no memory
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    named, problems = [], []
    for name, p in skeleton.named_parameters():
        t = state.get(name)
        if t is None or tuple(t.shape) != tuple(p.shape):
            problems.append(f"{name}: expected {tuple(p.shape)}, found "
                            f"{'nothing' if t is None else tuple(t.shape)}")
        else:
            named.append((name, t.to(torch.float32)))
    if problems:
        raise ValueError(f"{model_dir}: weights do not match the model's parameters: {problems[:5]}")
    return named
