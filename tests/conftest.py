"""Shared fixtures. Integration tests (marked slow) start real Ray, vLLM and DeepSpeed."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def toy_world():
    """The cached toy teacher/student/data (built once, reused by every test and by the demo)."""
    from tasks.build import build_toy_world
    return build_toy_world(ROOT / "artifacts" / "toy", task="sort", seed=0)
