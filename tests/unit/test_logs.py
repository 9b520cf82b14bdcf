"""The ammd log lines and the progress display: a bar on a terminal, plain lines elsewhere."""
import io
import re

from cluster import logs

LINE = re.compile(r"^\[ammd \d\d:\d\d:\d\d\] (.*)$")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal: stands in for stderr on an interactive terminal,
    which a test run (output captured or piped) never has, and keeps what tqdm draws."""

    def isatty(self) -> bool:
        return True


def stats(step):
    return {"loss": 1.0 / step, "lr": 1e-3, "version": step // 4, "rollout_tps": 800.4,
            "learner_tps": 300.6, "rows": 16 * step}


def messages(out: str) -> list[str]:
    found = [LINE.match(line) for line in out.splitlines()]
    assert all(found), out  # every line in the ammd format
    return [m.group(1) for m in found]


def test_log_lines_go_to_the_current_stdout_once_each(capsys):
    logs.setup()
    logs.setup()  # idempotent: still one handler, one line per message
    logs.info("hello")
    logs.get_logger("trainer").info("from a child logger")
    assert messages(capsys.readouterr().out) == ["hello", "from a child logger"]


def test_plain_lines_every_5_percent_when_not_a_terminal(capsys):
    shown = logs.progress(40, stream=io.StringIO())  # a pipe or a file, as under ray job submit
    assert isinstance(shown, logs.LineProgress)
    for step in range(1, 41):
        shown.update(step, stats(step))
        shown.update(step, stats(step))  # a skipped non-finite step reports the same step again
    shown.close()
    lines = messages(capsys.readouterr().out)
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(2, 41, 2))
    assert lines[-1] == ("step 40/40 loss 0.0250 version 10 rollout 800 tok/s learner 301 tok/s "
                         "lr 1.00e-03 rows made 640")


def test_the_last_step_is_shown_even_off_the_5_percent_grid(capsys):
    shown = logs.progress(7, stream=io.StringIO())
    for step in range(1, 8):
        shown.update(step, stats(step))
    assert [line.split()[1] for line in messages(capsys.readouterr().out)] == [f"{s}/7" for s in range(1, 8)]
    shown = logs.progress(45, stream=io.StringIO())
    for step in range(1, 46):
        shown.update(step, stats(step))
    steps = [line.split()[1] for line in messages(capsys.readouterr().out)]
    assert steps[-2:] == ["44/45", "45/45"] and len(steps) == 23


def test_a_bar_on_a_terminal_with_log_lines_intact(capsys):
    term = FakeTerminal()
    shown = logs.progress(12, start=4, stream=term)  # resumed at step 4
    assert isinstance(shown, logs.BarProgress)
    for step in range(5, 13):
        shown.update(step, stats(step))
        if step == 8:
            logs.info("checkpoint written")  # a log line while the bar is up
    shown.close()
    drawn = term.getvalue()
    assert "12/12" in drawn and "loss=0.0833" in drawn and "tok/s=301" in drawn
    assert " 4/12" in drawn  # it started where the resumed job was
    out = capsys.readouterr().out
    assert messages(out) == ["checkpoint written"]  # whole, and no plain progress lines
