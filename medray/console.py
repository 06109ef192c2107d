"""What a person sees on the terminal while medray trains: a few lines and one live progress display.

* **Quiet mode** (`quiet(...)`, turned on by the `medray` command unless `--verbose`): everything
  that is not medray's own output — Ray's per-report lines, worker banners, deprecation warnings,
  C++ log lines written to the process's stdout/stderr — goes to a log file instead of the
  terminal. It works at the file-descriptor level (fd 1 and 2 point at the log file), so it catches
  what Python's `logging` and `warnings` never see. medray's own lines (`say`) and the progress
  display go to the saved terminal; errors are printed there in full by the command line.
* **Progress**: rank 0 of a Ray Train job puts one small event per epoch (and, throttled, per
  step) on a Ray queue (`ray.util.queue.Queue`, an actor that needs no CPU); a thread on the driver
  reads it and draws a `rich` progress bar with the epoch, the loss and validation figures, the
  elapsed and the remaining time. When the output is not a terminal (CI, a log collector, `| tee`),
  it prints one plain line per epoch instead.

Used the same way by `medray train`, `cv`, `tune`, `demo` and the GAN: `with progress_run(label,
epochs) as queue:` around `trainer.fit()`, `config["progress"] = queue`, and `epoch_done(config,
…)` / `step_done(config, …)` in the training loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

STEP_EVENT_INTERVAL_S = 1.0  # at most one step event a second from a worker


class _State:
    terminal = None  # the terminal's stdout while quiet mode is on (else sys.stdout at call time)
    terminal_err = None  # and its stderr
    log_file = None  # the log file's Path while quiet mode is on
    log_stream = None
    live = None  # True: a rich display; False: plain lines; None: decide from the terminal
    epoch_lines = True  # plain mode: one line per epoch (cv and demo: one line per run)


def terminal():
    return _State.terminal or sys.stdout


def log_path() -> Path | None:
    return _State.log_file


def say(message: str) -> None:
    """One line for the person at the terminal (and the log file, when there is one)."""
    stream = terminal()
    print(message, file=stream, flush=True)
    if _State.log_stream is not None and stream is not _State.log_stream:
        print(message, file=_State.log_stream, flush=True)


def error(message: str) -> None:
    """An error, in full, on the terminal's stderr (and in the log file)."""
    stream = _State.terminal_err or sys.stderr
    print(message, file=stream, flush=True)
    if _State.log_stream is not None:
        print(message, file=_State.log_stream, flush=True)


@contextlib.contextmanager
def quiet(command: str, folder: str | Path | None = None, verbose: bool = False):
    """Send everything but medray's own lines to `folder/logs/COMMAND-TIME.log` (default folder:
    $MEDRAY_STORAGE or ~/medray-runs) for the duration of the block. `verbose`: do nothing."""
    if verbose or _State.terminal is not None:
        yield None
        return
    from medray.train_common import DEFAULT_STORAGE

    folder = Path(folder or (DEFAULT_STORAGE if "://" not in DEFAULT_STORAGE else "~/medray-runs")).expanduser()
    path = folder / "logs" / f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    import ray

    saved_mode = (_State.live, _State.epoch_lines)  # set_mode() lasts for this block only
    ray_was_up = ray.is_initialized()  # a caller's Ray (a notebook, a test session) is theirs to stop
    saved_out, saved_err = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # medray's lines go where the caller's sys.stdout/err go: the terminal behind fd 1/2 for the
    # command line; the object itself where a notebook or a test harness replaced them
    _State.terminal = (os.fdopen(os.dup(saved_out), "w", buffering=1) if _is_fd(sys.stdout, 1)
                       else _Borrowed(sys.stdout))
    _State.terminal_err = (os.fdopen(os.dup(saved_err), "w", buffering=1) if _is_fd(sys.stderr, 2)
                           else _Borrowed(sys.stderr))
    _State.live = _State.terminal.isatty() if _State.live is None else _State.live
    _State.log_file, _State.log_stream = path, log
    try:
        yield path
    finally:
        with contextlib.suppress(Exception):  # Ray's last worker lines arrive as it stops: into the log
            if ray.is_initialized() and not ray_was_up:
                ray.shutdown()
        for s in (sys.stdout, sys.stderr, _State.terminal, _State.terminal_err):
            with contextlib.suppress(Exception):
                s.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        _State.terminal.close()
        _State.terminal_err.close()
        _State.terminal = _State.terminal_err = None
        _State.log_file = _State.log_stream = None
        _State.live, _State.epoch_lines = saved_mode
        log.close()


def _is_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except Exception:  # io.UnsupportedOperation and the like: not a real file
        return False


class _Borrowed:
    """A stream medray writes to but does not own (closing it is a no-op)."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stream.flush()


def move_log(folder: str | Path) -> None:
    """Move the log file (if any, and `folder` is local) into `folder` as medray.log; logging
    goes on into it (the open file follows the rename)."""
    if _State.log_file is None or "://" in str(folder):
        return
    target = Path(folder).expanduser() / "medray.log"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"medray-{datetime.now():%Y%m%d-%H%M%S}.log")
        os.replace(_State.log_file, target)
        _State.log_file = target
    except OSError:  # another file system: the log stays where it is
        pass


def set_mode(live: bool | None = None, epoch_lines: bool | None = None) -> None:
    """live: force the rich display on (True) or off (False); epoch_lines: plain mode prints a line
    per epoch (True) or only one per run (False: `cv` and `demo`, which run many trainings)."""
    if live is not None:
        _State.live = live
    if epoch_lines is not None:
        _State.epoch_lines = epoch_lines


# ------------------------------------------------------------------------------------ worker side

def epoch_done(config: dict, epoch: int, metrics: dict) -> None:
    """Rank 0, at the end of an epoch: tell the driver (a no-op without a progress queue)."""
    q = config.get("progress")
    if q is None:
        return
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, type(None))) and k != "started_at"}
    with contextlib.suppress(Exception):  # the display is never a reason to fail a training
        q.put_nowait({"kind": "epoch", "epoch": epoch, "epochs": config["epochs"], **keep})


class StepTicker:
    """Rank 0, inside an epoch: at most one step event a second."""

    def __init__(self, config: dict, epoch: int):
        self.q, self.epoch, self.last = config.get("progress"), epoch, time.time()
        self.total = config.get("steps_per_epoch")

    def __call__(self, step: int) -> None:
        if self.q is None or time.time() - self.last < STEP_EVENT_INTERVAL_S:
            return
        self.last = time.time()
        with contextlib.suppress(Exception):
            self.q.put_nowait({"kind": "step", "epoch": self.epoch, "step": step, "steps": self.total})


# ------------------------------------------------------------------------------------ driver side

def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def _clock(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe_epoch(ev: dict, short: bool = False) -> str:
    """The figures of one epoch event, as the plain line (and, `short`, the live display) show them."""
    parts = []
    shown = (("train_loss", "loss"), ("critic_loss", "critic"), ("generator_loss", "gen"),
             ("val_loss", "val_loss"), ("val_accuracy", "val_acc"),
             ("val_balanced_accuracy", "val_bal_acc"), ("kmer4_js", "4-mer JS"))
    for key, label in shown:
        if short and key in ("val_loss", "val_balanced_accuracy", "generator_loss"):
            continue
        if key in ev:
            parts.append(f"{label} {_fmt(ev[key], '.4f' if 'loss' in key or key == 'kmer4_js' else '.3f')}")
    return "  ".join(parts)


class _Display:
    """Draws events for one run: a rich progress bar on a terminal, else plain lines."""

    def __init__(self, label: str, epochs: int):
        self.label, self.epochs, self.t0 = label, epochs, time.time()
        self.first_epoch = None
        self.done_epochs = 0
        self.last_line = ""
        self.live = _State.live if _State.live is not None else terminal().isatty()
        self.progress = None
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24),
                                     TextColumn("epoch {task.fields[epoch]}/{task.total:.0f}"),
                                     TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[figures]}"),
                                     console=Console(file=terminal()), transient=False,
                                     # sys.stdout/err lead to the log file: rich must not pull them in
                                     redirect_stdout=False, redirect_stderr=False)
            self.progress.start()
            self.task = self.progress.add_task(label, total=epochs, epoch=0, figures="starting the workers…")

    def event(self, ev: dict) -> None:
        if ev["kind"] == "epoch":
            if self.first_epoch is None:
                self.first_epoch, self.t_first, self.first_seconds = ev["epoch"], time.time(), ev.get("seconds")
            self.done_epochs = ev["epoch"]
            self.last_line = describe_epoch(ev)
            if ev.get("resumed_from_epoch"):
                self._note(f"[medray] {self.label}: resumed from the checkpoint of epoch {ev['resumed_from_epoch']}")
            if self.progress is not None:
                self.progress.update(self.task, completed=ev["epoch"], epoch=ev["epoch"],
                                     figures=describe_epoch(ev, short=True))
            elif _State.epoch_lines:
                say(f"[medray] {self.label} epoch {ev['epoch']}/{self.epochs}  {self.last_line}  "
                    f"{_fmt(ev.get('seconds'), '.1f')}s  elapsed {_clock(time.time() - self.t0)}"
                    f"{self._left()}")
        elif ev["kind"] == "step" and self.progress is not None and ev.get("steps"):
            done = ev["epoch"] - 1 + min(1.0, ev["step"] / ev["steps"])
            self.progress.update(self.task, completed=done, epoch=ev["epoch"])

    def _note(self, line: str) -> None:
        if self.progress is not None:
            self.progress.console.print(line)
        else:
            say(line)

    def _left(self) -> str:
        """Time left: the epochs to go at the pace since the first epoch (which pays the start-up)."""
        if self.first_epoch is None or self.done_epochs >= self.epochs:
            return ""
        if self.done_epochs > self.first_epoch:
            per_epoch = (time.time() - self.t_first) / (self.done_epochs - self.first_epoch)
        else:
            per_epoch = self.first_seconds or 0.0
        return f"  left ~{_clock(per_epoch * (self.epochs - self.done_epochs))}"

    def close(self, ok: bool) -> None:
        if self.progress is not None:
            if ok and self.first_epoch is None:  # nothing left to train: the run had every epoch
                self.progress.update(self.task, completed=self.epochs, epoch=self.epochs,
                                     figures="already trained (checkpoint)")
            self.progress.stop()
        elif ok and not _State.epoch_lines:
            say(f"[medray] {self.label}: {self.done_epochs} epochs in {_clock(time.time() - self.t0)}  "
                f"{self.last_line}")


@contextlib.contextmanager
def progress_run(label: str, epochs: int):
    """A progress queue for one Ray Train run (put it in the train loop config as "progress"), and
    a driver thread that draws its events until the block ends."""
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    display = _Display(label, epochs)
    stop = threading.Event()

    def drain():  # one blocking call per event (or per half second when idle): no busy polling
        while True:
            try:
                ev = queue.get(block=True, timeout=0.5)
            except Empty:
                if stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone
                return
            try:
                display.event(ev)
            except Exception:  # a drawing problem never stops training
                pass

    thread = threading.Thread(target=drain, name="medray-progress", daemon=True)
    thread.start()
    ok = False
    try:
        yield queue
        ok = True
    finally:
        stop.set()
        thread.join(timeout=10)
        display.close(ok)
        with contextlib.suppress(Exception):
            queue.shutdown()
