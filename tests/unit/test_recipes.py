"""The shipped configs are valid and the GPU recipes fit the nodes their comments name.

No GPU and no hub access here: ``ammd check --config-only`` validates a recipe without opening
its models, and the resource plan is summed from the config alone.
"""
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config
from cluster.plan import resource_plan

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
GPU_NODES = {"gpu-1node.yaml": 8, "gpu-multinode.yaml": 16}  # GPUs the recipe's header promises


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_accepts_every_shipped_config(path, capsys):
    assert main(["check", str(path), "--config-only"]) == 0
    assert "is valid" in capsys.readouterr().out


@pytest.mark.parametrize("name,gpus", GPU_NODES.items())
def test_gpu_recipe_uses_exactly_its_gpus(name, gpus):
    cfg = load_config(Path(CONFIGS[0]).parent / name)
    plan = {d.kind: d for d in resource_plan(cfg)}
    assert sum(d.gpus for d in plan.values()) == gpus
    assert cfg.learner.device == "cuda" and cfg.learner.precision == "bf16"
    for kind in ("student", "teacher"):  # tensor-parallel ranks fit the GPUs an engine holds
        res = getattr(cfg.rollout, kind)
        assert res.gpus >= res.tensor_parallel_size and res.gpu_memory_utilization


def test_tensor_parallel_needs_its_gpus(capsys):
    assert main(["check", "configs/gpu-1node.yaml", "--config-only", "rollout.teacher.tensor_parallel_size=2"]) == 2
    assert "tensor_parallel_size=2 needs gpus >= 2" in capsys.readouterr().err


def test_cpu_plan_asks_for_no_gpu():
    cfg = load_config(Path(CONFIGS[0]).parent / "local-cpu.yaml")
    assert sum(d.gpus for d in resource_plan(cfg)) == 0
