"""The LoRA memory benchmark (``python -m bench.lora_memory``, in ``make bench-memory``) through its
real harness on a tiny student, so that it cannot rot unseen: both configurations run the real
learner rank in their own subprocess, and every figure and ratio comes back finite."""
import json
import math

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.extended]
TINY = ["--hidden", "128", "--layers", "2", "--intermediate", "256", "--vocab", "512", "--r", "4", "--steps", "2",
        "--prompt", "8", "--response", "8"]


def test_the_lora_bench_measures_both_configurations_side_by_side(tmp_path):
    from bench.lora_memory import main

    out = tmp_path / "lora_memory.json"
    result = main([*TINY, "--out", str(out)])
    assert json.loads(out.read_text()) == result
    full, lora = result["rows"]
    assert (full["config"], lora["config"]) == ("full", "lora")
    assert full["trainable_params"] == result["student_params"] > lora["trainable_params"] > 0
    for key in ("peak_mib", "seconds_per_step", "trainable_params", "export_seconds"):
        ratio = result["lora_over_full"][key]
        assert math.isfinite(ratio) and ratio > 0, (key, ratio)
    assert result["command"].startswith("python -m bench.lora_memory --hidden 128")
