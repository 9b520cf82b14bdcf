"""The quality benchmark's aggregation: statistics, bolding, beta selection and the verdict."""
import numpy as np
import pytest

from bench import quality_report as qr


def run(task, seed, method, test, val, rows="mixed"):
    return {"task": task, "seed": seed, "method": method, "rows": rows, "metric": "rouge_l",
            "test": test, "val": val, "teacher": 0.9, "student_before": 0.5, "steps": 10,
            "curves": [{"step": s, "loss": 1.0 / s, "d_on": 0.5 / s, "d_off": 0.4 / s,
                        "adversary_loss": -0.3} for s in range(1, 11)]}


@pytest.fixture
def runs():
    out = []
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        out += [run("a", seed, "FKL", 0.60 + noise, 0.6),
                run("a", seed, "SFT", 0.55 + noise, 0.5, rows="dataset"),
                # beta 0.5 has the best TEST mean, beta 1 the best VALIDATION mean
                run("a", seed, "AMM (beta=0)", 0.58 + noise, 0.58, rows="student"),
                run("a", seed, "AMM (beta=0.5)", 0.70 + noise, 0.60),
                run("a", seed, "AMM (beta=1)", 0.65 + 3 * noise, 0.70, rows="teacher")]
    return out


def test_stats_match_numpy():
    v = [0.1, 0.4, 0.25]
    mean, std, n = qr.stats(v)
    assert (mean, n) == (pytest.approx(np.mean(v)), 3) and std == pytest.approx(np.std(v, ddof=1))
    assert qr.stats([0.3])[1] == 0.0


def test_best_beta_is_picked_on_validation_not_test(runs):
    assert qr.best_amm(runs, "a") == "AMM (beta=1)"
    labels = [label for label, *_ in qr.task_rows(runs, "a")]
    assert labels[-1] == "AMM, best on validation: AMM (beta=1)"


def test_table_bolds_only_the_best_mean(runs):
    table = qr.task_table(runs, "a")
    bold = [line for line in table.splitlines() if "**" in line]
    assert len(bold) == 1 and bold[0].startswith("| AMM (beta=0.5)")
    assert "| Teacher | – | – | 90.0 ± 0.0 |" in table


def with_trl(runs, sft_gap=0.0):
    """The fixture's runs plus TRL's SFT and GKD runs and ammd's GKD mix (lr 1e-3 picked)."""
    out = [dict(r, lr=1e-3, selected=True) for r in runs]
    for seed, noise in enumerate((-0.01, 0.0, 0.01)):
        out += [dict(run("a", seed, "TRL SFTTrainer", 0.55 + sft_gap + noise, 0.5, rows="dataset"), lr=3e-3),
                dict(run("a", seed, "GKD mix (JSD 0.5, student + dataset)", 0.62 + noise, 0.6), lr=1e-3),
                dict(run("a", seed, "TRL GKDTrainer (lambda 0.5, beta 0.5)", 0.63 + noise, 0.6), lr=1e-3)]
    return out


def test_parity_holds_within_the_spread_and_fails_beyond_it(runs):
    lines = qr.parity(with_trl(runs), "a")
    sft = next(line for line in lines if line.startswith("SFT "))
    gkd = next(line for line in lines if line.startswith("GKD mix"))
    assert "at least as good" in sft and "at least as good" in gkd  # -1 point, spread 1 point
    assert lines[-1].startswith("best: AMM (beta=0.5)") and "TRL GKDTrainer" in lines[-1]
    worse = qr.parity(with_trl(runs, sft_gap=0.05), "a")
    assert "**worse**" in next(line for line in worse if line.startswith("SFT "))
    rows = qr.task_rows(with_trl(runs), "a")
    assert [r[0] for r in rows][-2:] == ["TRL SFTTrainer", "TRL GKDTrainer (lambda 0.5, beta 0.5)"]
    assert rows[0][2] == "0.001"  # the lr column


def test_lr_search_table_and_picked_runs_only():
    from bench.quality import pick_lrs
    grid = [run("a", 0, "FKL", 0.9, val, rows="mixed") | {"lr": lr}
            for lr, val in ((3e-4, 0.5), (1e-3, 0.7), (3e-3, 0.7))]
    assert pick_lrs(grid, ["FKL"]) == {"FKL": 1e-3}  # a tie goes to the smaller rate
    for r in grid:
        r["selected"] = r["lr"] == 1e-3
    assert [r["lr"] for r in qr.completed({"runs": grid})] == [1e-3]
    table = qr.lr_table(grid, "a", [3e-4, 1e-3, 3e-3])
    assert "| FKL | 50.0 | **70.0** | 70.0 |" in table


def test_usage_table_shows_the_worst_seed():
    runs = [run("a", s, "FKL", 0.5, 0.5) | {"rollout_usage": {
        "student": {"generated": g, "trained": 100, "ratio": g / 100},
        "teacher": {"generated": 100, "trained": 100, "ratio": 1.0}}} for s, g in enumerate((100, 112))]
    assert "| a | FKL | 1.12 | 1.00 | – |" in qr.usage_table(runs, ["a"])


def test_verdict_compares_against_the_spread(runs):
    # best-on-validation AMM (beta 1): 0.65 ± 0.03 vs FKL 0.60 ± 0.01 -> a real win
    assert "beats the best non-AMM method, FKL" in qr.verdict(runs, "a")
    close = [dict(r, test=r["test"] - 0.04) if r["method"] == "AMM (beta=1)" else r for r in runs]
    assert "ties with" in qr.verdict(close, "a")
    worse = [dict(r, test=r["test"] - 0.2) if r["method"] == "AMM (beta=1)" else r for r in runs]
    assert "loses to" in qr.verdict(worse, "a")


def test_outputs_and_benchmarks_section(runs, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# B\n\nbefore\n\n{qr.BEGIN}\nOLD SECTION\n{qr.END}\n\nafter\n")
    failed = {"task": "a", "seed": 3, "method": "RKL", "error": "loss was NaN/inf"}
    result = {"commit": "abc", "command": "python -m bench.quality", "wall_seconds": 60.0,
              "overrides": [], "runs": runs + [failed]}
    qr.write_outputs(result, tmp_path / "out", md)
    doc = md.read_text()
    assert "OLD SECTION" not in doc and doc.startswith("# B\n\nbefore") and doc.rstrip().endswith("after")
    assert "(out/quality_curves.png)" in doc and "#### a" in doc and "| 0.5 |" in doc
    assert (tmp_path / "out" / "quality_curves.png").stat().st_size > 10_000
    assert "| RKL |" not in doc and "a seed 3 RKL: loss was NaN/inf" in doc
    with pytest.raises(ValueError, match="markers"):
        qr.write_outputs(result, tmp_path / "out", tmp_path / "out" / "quality.md")


def test_reproduction_table_flags_means_outside_the_spread(runs):
    moved = [dict(r, test=r["test"] + (0.01 if r["method"] == "FKL" else 0.2 if r["method"] == "SFT" else 0))
             for r in runs]
    table = qr.reproduction_table({"runs": runs}, {"runs": moved})
    fkl = next(line for line in table.splitlines() if "| FKL |" in line)
    sft = next(line for line in table.splitlines() if "| SFT |" in line)
    assert fkl.endswith("| yes |") and sft.endswith("| **no** |")
    assert "4 of 5 method means agree" in table


def test_own_setting_keeps_the_users_models_and_data(tmp_path):
    from bench.quality import main, own_setting
    cfg = tmp_path / "job.yaml"
    cfg.write_text("name: mine\nmodels: {teacher: /m/t, student: /m/s}\ndata: {train: /d/train.jsonl}\n")
    setting = own_setting(3, cfg, ["learner.steps=7"], "/d/val.jsonl")
    assert (setting.task, setting.base.seed, setting.base.learner.steps) == ("mine", 3, 7)
    assert (setting.base.models.teacher, setting.val_path) == ("/m/t", "/d/val.jsonl")
    with pytest.raises(SystemExit):  # own models without a validation file: refused up front
        main(["--config", str(cfg)])


def test_cli_renders_and_compares_saved_results(runs, tmp_path, capsys):
    import json
    path = tmp_path / "quality.json"
    path.write_text(json.dumps({"commit": "abc", "command": "c", "wall_seconds": 1.0, "overrides": [],
                                "runs": runs}))
    qr.main(["render", str(path)])
    assert "#### a" in (tmp_path / "quality.md").read_text()
    qr.main(["compare", str(path), str(path)])
    assert "5 of 5 method means agree" in capsys.readouterr().out


def test_ablations_stay_out_of_the_full_table_and_get_their_own(runs, tmp_path):
    """An ablation (first seed only) with the best validation score of all must not become
    "AMM, best on validation", nor enter the tables over seeds; it is listed beside the full
    table's AMM variants on the same seed."""
    abl = dict(run("a", 0, "AMM chi2 (beta=0.5)", 0.99, 0.99), lr=3e-3, ablation=True, selected=True)
    every = [dict(r, lr=1e-3) for r in runs] + [abl]
    assert qr.best_amm(every, "a") == "AMM (beta=1)"
    assert "AMM chi2" not in qr.task_table(every, "a") and "AMM chi2" not in qr.verdict(every, "a")
    table = qr.variant_table(every, ["a"])
    assert "| AMM chi2 (beta=0.5) (ablation) | 99.0 | 99.0 | 0.003 |" in table
    assert "| AMM (beta=1) | 62.0 | 70.0 | 0.001 |" in table  # seed 0 of the full variant
    result = {"commit": "abc", "command": "c", "wall_seconds": 1.0, "overrides": [], "runs": every}
    text = qr.write_outputs(result, tmp_path)
    assert "16 runs (1 of them ablations)" in text and "AMM's ablations" in text


def test_curves_draw_the_true_distance_beside_the_learned_one(runs, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from unittest import mock
    with_true = [dict(r, curves=[dict(h, d_off_true=0.5 * h["d_off"]) for h in r["curves"]]) for r in runs]
    drawn = []
    real = matplotlib.axes.Axes.plot
    with mock.patch.object(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k) or real(ax, *a, **k)):
        qr.plot_curves(with_true, ["a"], tmp_path / "c.png")
    dashed = [k for k in drawn if k.get("linestyle") == "--"]
    # d_off_true of each of the three AMM variants, dashed in its own colour; none for d_on (not recorded)
    assert len(dashed) == 3 and {k["color"] for k in dashed} <= {k["color"] for k in drawn if k.get("label")}
