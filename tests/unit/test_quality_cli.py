"""bench.quality's command line: overrides may follow any list option, and bad input is named."""
import pytest

from bench.quality import METHODS, OVERRIDE, _parse_args


def test_overrides_after_list_options_are_not_read_as_methods_tasks_or_seeds():
    args, _ = _parse_args(["--tasks", "summarize", "--methods", "FKL", "AMM (beta=0.5)",
                           "learner.lr=3e-3", "--seeds", "3", "loss.params.adv_lr=0.1"])
    assert args.tasks == ["summarize"]
    assert args.methods == ["FKL", "AMM (beta=0.5)"]  # a label holding "=" stays a label
    assert args.seeds == [3]
    assert sorted(args.overrides) == ["learner.lr=3e-3", "loss.params.adv_lr=0.1"]


def test_no_method_label_looks_like_an_override():
    assert [label for label in METHODS if OVERRIDE.match(label)] == []


@pytest.mark.parametrize("argv, message", [
    (["--methods", "FKL", "AMM (beta=0.3)"], "unknown methods ['AMM (beta=0.3)']"),
    (["--seeds", "one"], "--seeds takes integers, got ['one']"),
    (["--seeds", "learner.lr=1"], "--seeds takes integers, got none"),
])
def test_bad_input_is_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse_args(argv)
    assert message in capsys.readouterr().err


def test_ablations_default_with_the_default_methods_only(capsys):
    from bench.quality import DEFAULT_ABLATIONS
    assert _parse_args([])[0].ablations == list(DEFAULT_ABLATIONS)
    assert _parse_args(["--methods", "FKL"])[0].ablations == []
    assert _parse_args(["--ablations", "none"])[0].ablations == []
    with pytest.raises(SystemExit):
        _parse_args(["--ablations", "AMM (beta=0.3)"])
    assert "unknown methods ['AMM (beta=0.3)']" in capsys.readouterr().err


def test_ablations_run_at_the_rate_of_the_best_amm_on_validation():
    from bench.quality import ablation_lr
    first = [{"method": "FKL", "lr": 3e-3, "val": 0.9, "selected": True},
             {"method": "AMM (beta=0.5)", "lr": 1e-3, "val": 0.5, "selected": True},
             {"method": "AMM (beta=0.5)", "lr": 3e-3, "val": 0.4, "selected": False},
             {"method": "AMM chi2 without policy gradient (beta=0.5)", "lr": 3e-3, "val": 0.8, "selected": True}]
    assert ablation_lr(first, [1e-3, 3e-3]) == 3e-3
    assert ablation_lr(first[:3], [1e-3, 3e-3]) == 1e-3
    assert ablation_lr(first[:1], [1e-4, 1e-3]) == 1e-3
