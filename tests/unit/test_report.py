"""The run report: JSON written atomically, Markdown summary, curves only when there is history."""
import json

from cluster.report import write_report


def test_report_with_amm_history_draws_its_curves(tmp_path):
    history = [{"step": i, "loss": 1.0 / i, "d_on": 0.5 / i, "d_off": 0.4 / i, "adversary_loss": -0.4 / i}
               for i in range(1, 20)]
    path = write_report(tmp_path, {"name": "x", "metric": "exact_match", "history": history})
    assert json.loads(path.read_text())["history"] == history
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert "curves.png" in (tmp_path / "report.md").read_text()


def test_report_without_history_has_no_curves(tmp_path):
    write_report(tmp_path, {"name": "x", "metric": "exact_match", "teacher_score": 0.9})
    assert not (tmp_path / "curves.png").exists()
    assert "| teacher_score | 0.9000 |" in (tmp_path / "report.md").read_text()
