"""Part (e): AMM's peak memory per learner rank against forward KL's at a 128k vocabulary.

It runs ``bench/amm_memory.py`` for forward KL, AMM with its default head and AMM with each
explicit head (``logratio``, the hidden x V head, and ``logratio_lowrank``, the recipes'). Each
configuration takes one learner step in a fresh subprocess (CPU, fp32, a Llama-architecture
student with hidden 2048 and a 131,072-token vocabulary, one layer) and reports its peak
resident memory above the imports. That is what one rank holds without ZeRO, and the adversary
heads are not partitioned by ZeRO anyway. The target is the default AMM within 1.5x of forward
KL's peak.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET = 1.5
CONFIGS = ("forward_kl", "amm_default", "amm_logratio", "amm_logratio_lowrank")
# Shrunk for --smoke: the path, not the figures.
SMOKE_SHAPE = ("--hidden", "64", "--vocab", "2048", "--intermediate", "128", "--rank", "8")


def run_memory(smoke: bool) -> dict:
    """The part's record: each configuration's peak, its ratio to forward KL's, the verdict."""
    from learner.loss_params import AMMParams

    with tempfile.TemporaryDirectory(prefix="amm_memory_") as tmp:
        out = Path(tmp) / "amm_memory.json"
        cmd = [sys.executable, "-m", "bench.amm_memory", "--configs", *CONFIGS, "--out", str(out),
               *(SMOKE_SHAPE if smoke else ())]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        measured = json.loads(out.read_text())
    rows = {r["config"]: r for r in measured["rows"]}
    ratio = rows["amm_default"]["ratio_to_forward_kl"]
    args = ["--configs", *CONFIGS, *(SMOKE_SHAPE if smoke else ())]
    return {"command": " ".join(["python -m bench.amm_memory", *args]),
            "shape": measured["shape"], "rows": measured["rows"],
            "default_head": AMMParams().head, "ratio": ratio, "target": TARGET,
            "met": ratio <= TARGET}
