"""The speed benchmark's smoke variant, through its real harness (``python -m bench.speed --smoke``).

Every part runs for real, shrunk: vLLM and transformers rollouts, weight pushes through every
registered transport on real Ray actors, three short jobs at max_staleness 0/1/2, a toy job, and
TRL's GKDTrainer in its own venv, AMM's memory against forward KL's. The JSON must hold every part with both absolute numbers, and
every ratio must be finite and positive, so that no part can rot unseen. The report's writer is
checked apart, fast: it rewrites only its own section of BENCHMARKS.md.
"""
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.extended  # ~4 min: CI runs it (make test-extended)
def test_smoke_run_measures_every_part(tmp_path):
    from learner.weight_sync import TRANSPORTS

    proc = subprocess.run([sys.executable, "-m", "bench.speed", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["smoke"] and result["commit"]
    assert shlex.split(result["command"])[:3] == ["python", "-m", "bench.speed"]
    assert result["machine"]["dtype"] in ("float32", "bfloat16") and result["machine"]["reason"]

    a = result["rollout"]
    assert a["vllm"]["tokens_per_s"] > 0 and a["hf_generate"]["tokens_per_s"] > 0
    push = result["weight_push"]["sizes"]
    assert push and all(s["memcpy_s"] > 0 for s in push)
    for s in push:  # every registered transport was measured, none skipped
        assert set(s["transports"]) == set(TRANSPORTS), s["transports"]
        assert all(t["push_s"] > 0 for t in s["transports"].values()), s["transports"]
    runs = result["overlap"]["runs"]
    assert [r["max_staleness"] for r in runs] == [0, 1, 2]
    for r in runs:
        assert r["steps"] > 0 and 0 < r["learner_busy_fraction"] <= 1 and r["student_tokens_per_s"] > 0, r
    assert runs[0]["max_on_policy_lag"] == 0  # the synchronous loop trains on current weights only
    for scale in ("realistic", "toy"):
        e = result["e2e"][scale]
        assert e["ammd"]["learner_steps_per_s"] > 0 and all(t["steps_per_s"] > 0 for t in e["trl"])
        assert all(t["token_check"]["equal"] for t in e["trl"])  # TRL trained on ammd's tokens

    memory = result["memory"]
    from bench.speed_memory import CONFIGS
    assert [r["config"] for r in memory["rows"]] == list(CONFIGS) and all(r["peak_mib"] > 0 for r in memory["rows"])
    default = next(r for r in memory["rows"] if r["config"] == "amm_default")
    same_head = next(r for r in memory["rows"] if r["config"] == f"amm_{memory['default_head']}")
    assert default["head_params"] == same_head["head_params"]  # "default" is the head learner/amm.py names

    status = result["status_load"]  # part (f): watching the job, unloaded and loaded runs
    assert [r["loaded"] for r in status["runs"]] == [False, True] and status["runs"][1]["requests_answered"] > 0
    assert all(r["steps_per_s"] > 0 for r in status["runs"]) and status["ratio"] > 0

    ratios = result["ratios"]
    expected = 1 + len(push) * len(TRANSPORTS) + 2 + 2 * 2 + (len(memory["rows"]) - 1) + 1
    assert len(ratios) == expected, ratios
    assert all(math.isfinite(v) and v > 0 for v in ratios.values()), ratios
    text = (tmp_path / "speed.md").read_text()
    for heading in ("#### (a)", "#### (b)", "#### (c)", "#### (d)", "#### (e)", "#### (f)"):
        assert heading in text


def fake_result() -> dict:
    run = {"max_staleness": 0, "steps": 2, "batch": 4, "loop_seconds": 1.0, "learner_busy_fraction": 0.5,
           "learner_steps_per_s": 2.0, "learner_tokens_per_s": 50.0, "student_tokens_per_s": 40.0,
           "student_tokens_vs_sync": 1.0, "student_busy_fraction": 0.2, "max_on_policy_lag": 0}
    engine = {"tokens_per_s": 100.0, "runs_tokens_per_s": [100.0], "mean_response_tokens": 9.5}
    return {"commit": "abc1234", "command": "python -m bench.speed", "smoke": False, "wall_seconds": 60.0,
            "machine": {"cpu": "cpu", "cores": 2, "ram_gib": 24, "dtype": "float32", "reason": "why",
                        "gpu": "none"},
            "models": {"student": {"params": 20e6}, "teacher": {"params": 100e6}},
            "rollout": {"vllm": engine, "hf_generate": {**engine, "tokens_per_s": 50.0}, "ratio": 2.0,
                        "target": 1.3, "met": True, "prompts": 4, "max_tokens": 8, "stop_ids": 3,
                        "stop_every": 32, "threads": 1, "dtype": "float32", "repeats": 1},
            "weight_push": {"error": "RuntimeError: no RAM"},
            "overlap": {"runs": [run, {**run, "max_staleness": 1, "student_tokens_vs_sync": 1.5}],
                        "ratio": 1.5, "target": 1.3, "target_busy": 0.8, "met": False},
            "e2e": {"toy": {"error": "RuntimeError: TRL failed"}},
            "memory": {"command": "python -m bench.amm_memory", "default_head": "logratio_lowrank",
                       "shape": {"hidden": 2048, "vocab": 131072, "layers": 1, "rows": 4, "response": 32, "rank": 64},
                       "rows": [{"config": "forward_kl", "head_params": 0, "peak_mib": 100.0, "ratio_to_forward_kl": 1.0},
                                {"config": "amm_default", "head_params": 9, "peak_mib": 104.0,
                                 "ratio_to_forward_kl": 1.04},
                                {"config": "amm_logratio", "head_params": 99, "peak_mib": 213.0,
                                 "ratio_to_forward_kl": 2.13}],
                       "ratio": 1.04, "target": 1.5, "met": True},
            "status_load": {"runs": [{"loaded": False, "steps_per_s": 5.0, "loop_seconds": 20.0, "requests_answered": 0},
                                     {"loaded": True, "steps_per_s": 4.9, "loop_seconds": 20.4,
                                      "requests_answered": 1000}],
                            "rate": 50.0, "ratio": 0.98, "target": 0.95, "met": True}}


def test_report_rewrites_only_its_section(tmp_path):
    from bench.speed_report import BEGIN, END, collect_ratios, write_outputs

    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nThe reading, by hand.\n")
    result = fake_result()
    assert collect_ratios(result) == {"a_vllm_over_hf_generate_tokens_per_s": 2.0,
                                      "c_staleness1_over_sync_student_tokens_per_s": 1.5,
                                      "e_amm_default_over_forward_kl_peak_memory": 1.04,
                                      "e_amm_logratio_over_forward_kl_peak_memory": 2.13,
                                      "f_loaded_over_unloaded_steps_per_s": 0.98}
    write_outputs(result, tmp_path / "out", md)
    doc = md.read_text()
    assert doc.startswith("# Benchmarks\n\nbefore\n\n") and doc.endswith(f"{END}\n\nThe reading, by hand.\n")
    assert "old table" not in doc and "commit `abc1234`" in doc and "**2.00x**" in doc
    assert "Not measured: RuntimeError: no RAM" in doc and "**missed**" in doc
    assert "| AMM, default head (`logratio_lowrank`) | 9 | 104 | 1.04 |" in doc
    assert "Default AMM / forward KL: **1.04x** (target <= 1.5x: **met**)" in doc
    assert "| 2 | 50/s | 1000 | 20.4 | 4.900 |" in doc and "Loaded / unloaded: **0.980x** steps/s" in doc
    assert json.loads((tmp_path / "out" / "speed.json").read_text())["commit"] == "abc1234"
