"""Training progress: plain log lines (step, loss terms, img/s, ETA) when the output is not a terminal, throttled;
the interactive bar, and no log lines, on a terminal."""

import io
import logging

from singer_deploy.train.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(progress, clock, steps, seconds_per_step, log_every):
    for step in range(progress.start + 1, steps + 1):
        clock.now += seconds_per_step
        if step % log_every == 0 or step == steps:
            progress.logged({"step": step, "loss": 1.0 / step, "kd": 0.5, "out": 0.25, "info": 0.125, "lr": 1e-3,
                             "img_s": 64.0})
        progress.advance()
    progress.close()


def test_redirected_output_gets_plain_lines_at_most_every_period(caplog):
    clock, stream = Clock(), io.StringIO()
    progress = Progress(0, 100, "distil[singer]", stream=stream, every_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="singer_deploy.train.progress"):
        _run(progress, clock, steps=100, seconds_per_step=0.5, log_every=5)   # 50 s, a record every 2.5 s
    lines = [record.getMessage() for record in caplog.records]
    assert stream.getvalue() == ""                       # no bar redraws in the file
    # The first logged step (at 2.5 s), then the first one 10 s after the last line, and the last step.
    assert [int(line.split()[2].split("/")[0]) for line in lines] == [5, 25, 45, 65, 85, 100]
    assert lines[0] == ("distil[singer] step 5/100 (5%) | loss 0.2 kd 0.5 out 0.25 info 0.125 | 64.0 img/s | "
                        "ETA 48s")
    assert lines[-1].endswith("| done in 50s")


def test_a_resumed_run_counts_its_eta_from_the_steps_it_runs(caplog):
    clock = Clock()
    progress = Progress(80, 100, "distil[fitnet]", stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="singer_deploy.train.progress"):
        clock.now = 2.0
        progress.logged({"step": 90, "loss": 0.5})
    assert caplog.records[0].getMessage() == "distil[fitnet] step 90/100 (90%) | loss 0.5 | ETA 2s"


def test_a_terminal_gets_the_bar_and_no_log_lines(caplog):
    clock, terminal = Clock(), Terminal()
    progress = Progress(0, 20, "distil[singer]", stream=terminal, clock=clock)
    with caplog.at_level(logging.INFO, logger="singer_deploy.train.progress"):
        _run(progress, clock, steps=20, seconds_per_step=1.0, log_every=5)
    assert caplog.records == []
    assert "distil[singer]" in terminal.getvalue() and "20/20" in terminal.getvalue() and "\r" in terminal.getvalue()


def test_disabled_progress_writes_nothing(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="singer_deploy.train.progress"):
        _run(Progress(0, 10, "x", enabled=False, stream=stream, clock=Clock()), Clock(), 10, 1.0, 2)
    assert stream.getvalue() == "" and caplog.records == []
