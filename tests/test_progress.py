"""Progress off a terminal: plain lines a log file shows, with a heartbeat for long items."""

from __future__ import annotations

import io
import time

from rankwise.core.progress import PlainReporter, RichReporter, cli_reporter


def test_plain_lines_say_start_items_and_end() -> None:
    stream = io.StringIO()
    reporter = PlainReporter(stream, min_interval=0.0, heartbeat=60.0)
    with reporter.task("calibrating", total=2) as advance:
        advance()
        advance(status="loss 2.0")
    reporter.log("summary")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[calibrating] start, 2 items"
    assert lines[1].startswith("[calibrating] 1/2 (+")
    assert lines[2].startswith("[calibrating] 2/2 (+") and lines[2].endswith("loss 2.0")
    assert lines[3].startswith("[calibrating] done: 2/2 in ")
    assert lines[4] == "summary"


def test_a_long_item_prints_that_the_run_is_alive() -> None:
    stream = io.StringIO()
    reporter = PlainReporter(stream, min_interval=0.0, heartbeat=0.15)
    with reporter.task("fisher", total=1) as advance:
        time.sleep(0.5)
        advance()
    assert "[fisher] still running: 0/1" in stream.getvalue()


def test_fast_items_are_thinned_but_the_last_is_printed() -> None:
    stream = io.StringIO()
    reporter = PlainReporter(stream, min_interval=60.0, heartbeat=60.0)
    with reporter.task("eval", total=50) as advance:
        for _ in range(50):
            advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[1].startswith("[eval] 50/50")


def test_the_cli_picks_plain_lines_off_a_terminal() -> None:
    # pytest captures stderr: not a terminal
    assert isinstance(cli_reporter(), PlainReporter)
    assert not isinstance(cli_reporter(), RichReporter)
