"""Every method of the quality benchmark is a valid job: its overrides build a config.

The integration smoke test runs only the default set through the real job (time); this
catches a misspelt override in the others without starting anything.
"""
import pytest

from bench.quality import DEFAULT_METHODS, METHODS, ROWS_SOURCES
from bench.trl_runner import TRL_METHODS
from cluster.config import build_config


@pytest.mark.parametrize("label", [m for m in METHODS if m not in TRL_METHODS])
def test_ammd_method_overrides_build_a_config(label):
    rows, overrides = METHODS[label]
    cfg = build_config({}, overrides)
    assert rows in ROWS_SOURCES
    # The rows a method claims are the rows its config asks the buffer for.
    frac = cfg.buffer.on_policy_fraction
    sources = ({"student"} if frac > 0 else set()) | (
        {cfg.rollout.off_policy} if frac < 1 else set())
    assert sources == ROWS_SOURCES[rows], label


def test_default_methods_cover_every_trl_counterpart():
    from bench.quality_report import COUNTERPARTS
    assert set(DEFAULT_METHODS) >= set(COUNTERPARTS) | set(COUNTERPARTS.values())
    assert all(m in METHODS for m in DEFAULT_METHODS)
