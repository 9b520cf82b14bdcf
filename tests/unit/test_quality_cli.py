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
