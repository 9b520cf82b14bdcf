"""The lines ``ammd run`` ends with (cluster.report.ending): what a person reads first, in place
of the JSON dump the command printed before. Checked on a report shaped like run_job's."""
import math

from cluster.report import ending


def report(**more):
    base = {"name": "local-cpu", "metric": "exact_match", "teacher_score": 0.97, "student_score_before": 0.295,
            "student_score_after": 0.435, "steps": 50, "wall_seconds": 141.6, "seconds_to_first_step": 86.4, "rollout_tokens_per_s": 1234.4,
            "learner_tokens_per_s": 56789.0, "restarts": {}, "lost_rows": 0, "student_dir": "/r/local-cpu/student"}
    return {**base, **more}


def test_the_ending_names_the_scores_the_run_and_where_things_are(tmp_path):
    (tmp_path / "tb").mkdir()
    lines = ending(report(), tmp_path).splitlines()
    assert lines[0] == "ammd run local-cpu: done"
    text = "\n".join(lines)
    assert "exact_match 0.295 -> 0.435 (teacher 0.970)" in text
    assert "50 in 142 s, the first 86 s after start" in text and "1,234 rollout, 56,789 learner" in text
    assert "restarts   none" in text and "/r/local-cpu/student" in text
    assert str(tmp_path / "report.md") in text and f"tensorboard --logdir {tmp_path / 'tb'}" in text
    assert "{" not in text and len(lines) <= 10  # a short table, not JSON
    values = [line[2:].split("  ", 1) for line in lines[1:]]  # "  key<pad>  value": one column of keys
    assert len({len(line) - len(line.lstrip()) for line in lines[1:]}) == 1 and all(len(v) == 2 for v in values)


def test_restarts_lost_rows_and_missing_scores_are_shown_as_they_are(tmp_path):
    text = ending(report(restarts={"teacher-0": 1, "student-0": 3}, lost_rows=16, teacher_score=None,
                         student_score_after=math.nan), tmp_path)
    assert "student-0 x3, teacher-0 x1" in text and "lost rows  16" in text
    assert "-> nan (teacher n/a)" in text
    assert "after start" not in ending(report(seconds_to_first_step=None), tmp_path)
    assert "tensorboard" not in text  # no tb/ directory: TensorBoard was off


def test_the_first_step_time_is_kept_from_the_first_step_only():
    from cluster.job_state import JobState
    state = JobState()
    state.record_step({"loss": 1.0}, 10)
    first = state.first_step_at
    state.record_step({"loss": 0.5}, 10)
    assert first is not None and state.first_step_at == first
    assert "first_step_at" not in state.saved(version=1)  # a resume measures its own start-up
