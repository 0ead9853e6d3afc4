"""A stage's console output, turned into log lines while the stage runs.

Why: a stage is a `dvc repro` subprocess. Captured whole, its output reached Prefect as one
record at the end (after 50 minutes of training, or never if the worker died); left uncaptured,
it reached only the worker's terminal. Read line by line instead, every line becomes a log
record as it is printed, so the Prefect UI follows a run live.

Two kinds of console output do not belong in a log. Progress bars (tqdm, which the trainers and
the pre-training loop use) redraw one line with carriage returns, ten times a second: each bar
is condensed to its first frame, a frame per `step_pct` percent or per `every_s` seconds,
whichever comes first, and its last frame. DVC's advice to `git add dvc.lock` and `dvc push`
is addressed to someone at a terminal; the flow does both itself, so the hints are dropped.
And a stage that prints nothing for `quiet_s` (a model's probes, a long evaluation) gets a line
saying it still runs, so a silent stage does not look like a hung one.
"""

from __future__ import annotations

import codecs
import os
import re
import select
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tracetune.console import is_dvc_hint

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
PERCENT = re.compile(r"(\d{1,3})%\|")  # tqdm: `desc:  40%|####      | 4/10 [...]`
COUNTER = re.compile(r"\d+(?:\.\d+)?[kMG]?(?:it| examples)? \[\d")  # tqdm without a total
DRAWN = re.compile(r"\d{1,3}%\|.*\]\s*$")  # a whole tqdm frame: it ends with `[...]`
SEGMENT = re.compile(r"([^\r\n]*)(\r\n|\r|\n)")
# DVC's "Running stage 'sft':": the run log already names the stage's task run on every line.
RUNNING_STAGE = re.compile(r"Running stage '[^']+':$")
TAIL_LINES = 200


def clean(text: str) -> str:
    """A segment without colour codes or trailing blanks."""
    return ANSI_ESCAPE.sub("", text).rstrip()


def is_progress(text: str) -> bool:
    """Whether a newline-ended line is a progress bar's frame (a bar ends with its last one)."""
    return bool(PERCENT.search(text) or COUNTER.search(text))


def percent(text: str) -> int | None:
    found = PERCENT.search(text)
    return int(found[1]) if found else None


def bar_key(text: str) -> str:
    """What tells bars apart: the text before the first digit (tqdm's `desc`)."""
    return re.split(r"\d", text, maxsplit=1)[0].strip()


@dataclass
class _Bar:
    shown: str
    shown_pct: int | None
    shown_at: float
    pending: str = ""


@dataclass
class Condenser:
    """Turns console segments into the lines worth logging (see the module docstring)."""

    every_s: float = 120.0
    step_pct: int = 25
    quiet_s: float = 300.0  # a line saying the stage is alive after this long without output
    clock: Callable[[], float] = time.monotonic
    bars: dict[str, _Bar] = field(default_factory=dict)

    def line(self, raw: str) -> list[str]:
        """A newline-ended segment: an ordinary line, a hint, or a bar's last frame."""
        text = clean(raw)
        if not text.strip() or is_dvc_hint(text) or RUNNING_STAGE.match(text.strip()):
            return []
        if is_progress(text):
            return self._frame(text, final=True)
        return [text]

    def frame(self, raw: str) -> list[str]:
        """A carriage-return-ended segment: a frame of a bar that will be redrawn."""
        text = clean(raw)
        return self._frame(text, final=False) if text.strip() else []

    def drawn(self, raw: str) -> list[str]:
        """The frame a bar has drawn but not yet ended (tqdm ends a frame by starting the next):
        taken now, or a slow step's frame would show only when the next step is done."""
        text = clean(raw)
        return self._frame(text, final=False) if DRAWN.search(text) else []

    def close(self) -> list[str]:
        """The last frame of each bar still open (a stage that stopped mid-bar)."""
        left = [bar.pending for bar in self.bars.values() if bar.pending]
        self.bars.clear()
        return left

    def _frame(self, text: str, final: bool) -> list[str]:
        key, now, pct = bar_key(text), self.clock(), percent(text)
        bar = self.bars.get(key)
        if final:
            self.bars.pop(key, None)  # the bar is done: one of the same name starts afresh
            return [] if bar is not None and bar.shown == text else [text]
        if bar is None:
            self.bars[key] = _Bar(text, pct, now)
            return [text]
        if text == bar.shown:
            return []
        crossed = pct is not None and (
            bar.shown_pct is None or pct // self.step_pct > bar.shown_pct // self.step_pct
        )
        if crossed or now - bar.shown_at >= self.every_s:
            self.bars[key] = _Bar(text, pct, now)
            return [text]
        bar.pending = text
        return []


def split_segments(buffer: str) -> tuple[list[tuple[str, bool]], str]:
    """Complete segments as (text, ended by a newline), and what is left to complete.

    A trailing carriage return waits for the next read: it may be the first half of `\\r\\n`.
    """
    segments: list[tuple[str, bool]] = []
    end = 0
    for found in SEGMENT.finditer(buffer):
        if found.end() == len(buffer) and found[2] == "\r":
            break
        segments.append((found[1], found[2] != "\r"))
        end = found.end()
    return segments, buffer[end:]


def stream_process(
    argv: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    emit: Callable[[str], None],
    condenser: Condenser | None = None,
) -> tuple[int, str]:
    """Run `argv` with stdout and stderr merged, `emit` each condensed line as it arrives.

    Returns the exit code and the last lines emitted (where an error message is).
    """
    condenser = condenser or Condenser()
    kept: deque[str] = deque(maxlen=TAIL_LINES)

    last = output = time.monotonic()  # the last line logged, the last line the stage printed

    def send(lines: list[str]) -> None:
        nonlocal last, output
        for line in lines:
            kept.append(line)
            emit(line)
            last = output = time.monotonic()

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    buffer = ""
    with subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        assert proc.stdout is not None
        while True:
            if time.monotonic() - last >= condenser.quiet_s:
                emit(f"(still running: nothing printed for {time.monotonic() - output:.0f} s)")
                last = time.monotonic()
            wait = max(0.0, condenser.quiet_s - (time.monotonic() - last))
            ready, _, _ = select.select([proc.stdout], [], [], wait)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)  # unbuffered: select sees it all
            if not chunk:
                break
            segments, buffer = split_segments(buffer + decoder.decode(chunk))
            for text, newline in segments:
                send(condenser.line(text) if newline else condenser.frame(text))
            if buffer and not buffer.endswith("\r"):
                send(condenser.drawn(buffer))
        buffer += decoder.decode(b"", final=True)
        segments, _ = split_segments(buffer + "\n")
        for text, newline in segments:
            send(condenser.line(text) if newline else condenser.frame(text))
        send(condenser.close())
        code = proc.wait()
    return code, "\n".join(kept)
