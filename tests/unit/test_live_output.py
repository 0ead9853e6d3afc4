"""A stage's console output as log lines: progress bars condensed, DVC's hints dropped, live."""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

from flows.live_output import Condenser, split_segments, stream_process


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def frames(total: int, desc: str = "train") -> list[str]:
    return [
        f"{desc}: {100 * i // total:3d}%|{'#' * (i * 10 // total):<10}| {i}/{total} [00:0{i % 10}]"
        for i in range(total + 1)
    ]


def test_a_bar_becomes_its_first_frame_one_per_quarter_and_its_last() -> None:
    condenser = Condenser(every_s=1000, clock=Clock())
    shown: list[str] = []
    *redrawn, last = frames(200)
    for frame in redrawn:
        shown += condenser.frame(frame)
    shown += condenser.line(last)  # tqdm ends a bar with its last frame and a newline
    assert shown[0].startswith("train:   0%") and shown[-1].startswith("train: 100%")
    assert len(shown) == 5, shown  # 0, 25, 50, 75 as they were crossed, then 100
    assert [s.split("%")[0][-3:].strip() for s in shown] == ["0", "25", "50", "75", "100"]


def test_a_slow_bar_shows_a_frame_every_so_many_seconds() -> None:
    clock = Clock()
    condenser = Condenser(every_s=30, clock=clock)
    shown: list[str] = []
    for frame in frames(1000)[:50]:  # 5% over 49 minutes
        clock.now += 60
        shown += condenser.frame(frame)
    assert len(shown) == 50  # each a minute apart: all shown
    clock.now, fast = 0.0, Condenser(every_s=30, clock=clock)
    shown = [line for frame in frames(1000)[:50] for line in fast.frame(frame)]
    assert len(shown) == 1  # all within a second and under 10%: only the first
    assert fast.close() == [frames(1000)[49]]  # a stage that stopped mid-bar: its last frame


def test_bars_with_different_names_are_condensed_separately_and_lines_pass() -> None:
    condenser = Condenser(every_s=1000, clock=Clock())
    assert condenser.frame(frames(10, "Map")[0]) == [frames(10, "Map")[0]]
    assert condenser.frame(frames(10, "train")[0]) == [frames(10, "train")[0]]
    assert condenser.line("{'loss': 2.31, 'epoch': 0.5}") == ["{'loss': 2.31, 'epoch': 0.5}"]
    assert condenser.frame("\x1b[2K") == [] and condenser.line("   ") == []


def test_dvc_hints_are_dropped_and_its_progress_kept() -> None:
    condenser = Condenser()
    output = (
        "Running stage 'job':\n> python job.py\nUpdating lock file 'dvc.lock'\n\n"
        "To track the changes with git, run:\n\n\tgit add dvc.lock .gitignore\n\n"
        "To enable auto staging, run:\n\n\tdvc config core.autostage true\n"
        "Use `dvc push` to send your updates to remote storage.\n"
    )
    segments, rest = split_segments(output)
    kept = [line for text, _ in segments for line in condenser.line(text)]
    assert kept == ["> python job.py"]  # lock-file news and the stage's name (the task's) dropped
    assert rest == ""


def test_segments_split_on_carriage_returns_and_wait_for_a_split_crlf() -> None:
    segments, rest = split_segments("\ra 1%\rb 2%\nline\r\nhalf\r")
    assert segments == [("", False), ("a 1%", False), ("b 2%", True), ("line", True)]
    assert rest == "half\r"  # the \n may come in the next read
    assert split_segments(rest + "\nnext")[0] == [("half", True)]


PROGRESS_SCRIPT = """
import sys, time
from tqdm import tqdm
print("starting", flush=True)
for i in tqdm(range(400), desc="steps", mininterval=0, file=sys.stderr):
    time.sleep(0.002)
print("half-way", flush=True)
time.sleep(1.5)
print("done", flush=True)
sys.exit(int(sys.argv[1]))
"""


def test_a_process_output_arrives_line_by_line_while_it_runs(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text(PROGRESS_SCRIPT)
    arrivals: list[tuple[float, str]] = []
    code, tail = stream_process(
        [sys.executable, "job.py", "3"],
        tmp_path,
        dict(os.environ, PYTHONUNBUFFERED="1"),
        lambda line: arrivals.append((time.monotonic(), line)),
    )
    lines = [line for _, line in arrivals]
    assert code == 3 and tail.splitlines()[-1] == "done"
    assert lines[0] == "starting" and lines[-2:] == ["half-way", "done"]
    bar = [line for line in lines if line.startswith("steps:")]
    assert 3 <= len(bar) <= 12, bar  # 400 frames drawn, a handful logged
    assert bar[-1].startswith("steps: 100%") and all("\r" not in line for line in lines)
    # "half-way" reached the caller while the process still ran, not at its exit
    assert arrivals[-1][0] - arrivals[-2][0] > 1.0


SLOW_STEPS = """
import sys, time
from tqdm import tqdm
for step in tqdm(range(3), desc="slow", mininterval=0, file=sys.stderr):
    time.sleep(1.5)
"""


def test_a_slow_steps_frame_is_logged_when_drawn_not_when_the_next_step_ends(
    tmp_path: Path,
) -> None:
    (tmp_path / "job.py").write_text(SLOW_STEPS)
    started, arrivals = time.monotonic(), []
    code, _ = stream_process(
        [sys.executable, "job.py"],
        tmp_path,
        dict(os.environ, PYTHONUNBUFFERED="1"),
        lambda line: arrivals.append((time.monotonic() - started, line)),
        Condenser(every_s=1000),
    )
    assert code == 0
    bar = [(round(t, 1), line.split("|")[0]) for t, line in arrivals]
    assert [line for _, line in bar] == ["slow:   0%", "slow:  33%", "slow:  67%", "slow: 100%"]
    # each frame arrived as drawn: 1.5 s apart, not two at once when the following one began
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(bar)]
    assert all(gap > 1.0 for gap in gaps), bar


def test_a_silent_stage_gets_a_line_saying_it_still_runs(tmp_path: Path) -> None:
    lines: list[str] = []
    code, _ = stream_process(
        [sys.executable, "-c", "import time; print('probing', flush=True); time.sleep(2.5)"],
        tmp_path,
        dict(os.environ),
        lines.append,
        Condenser(quiet_s=1.0),
    )
    assert code == 0 and lines[0] == "probing"
    assert 1 <= len(lines[1:]) <= 3, lines
    assert all(line.startswith("(still running: nothing printed for ") for line in lines[1:])
