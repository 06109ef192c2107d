"""What `medray train` prints: a few lines and one line per epoch when not on a terminal; Ray's own
output in a log file in the run directory; `--verbose` brings it back; errors reach the terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import shared

CLI = [sys.executable, "-m", "medray"]


def _train(tmp_path: Path, name: str, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    data = shared("genomic", "splice.csv")
    # batch 64, not the preset's 8: this test is about the console, and 30 epochs stay short
    return subprocess.run([*CLI, "train", "genomic", "--data", str(data), "--epochs", str(epochs), "--workers", "2",
                           "--batch-size", "64", "--storage", str(tmp_path / "runs"), "--name", name,
                           "--out", str(tmp_path / name), *extra],
                          capture_output=True, text=True, timeout=600)


def test_a_30_epoch_run_prints_a_line_per_epoch_and_ray_goes_to_the_run_log(tmp_path):
    r = _train(tmp_path, "quiet", 30)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    epochs = [int(m.group(1)) for line in lines if (m := re.search(r" epoch (\d+)/30 ", line))]
    assert epochs == list(range(1, 31))  # each epoch once, in order, grouped checkpoints or not
    text = "\n".join(lines)
    for noise in ("Reporting training result", "RayTrainWorker", "TrainController", "Warning", "WARNING"):
        assert noise not in text, noise
    assert re.search(r"epoch 1/30 .*val_acc \d\.\d{3}.*left ~\d+:\d\d", text)
    log = Path(re.search(r"\[medray\] log: (\S+)", text).group(1))
    assert log == tmp_path / "runs" / "quiet" / "medray.log"  # beside the run's checkpoints
    assert "Reporting training result" in log.read_text()  # Ray's lines are kept, just not shown


def test_verbose_shows_rays_output_and_errors_reach_the_terminal(tmp_path):
    r = _train(tmp_path, "loud", 1, "--verbose")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Reporting training result" in r.stdout + r.stderr
    assert not (tmp_path / "runs" / "loud" / "medray.log").exists()

    bad = tmp_path / "bad.fasta"
    bad.write_text(">s1 label=EI\nACGTACGT\n>s2 label=IE\nACGTXCGT\n")
    r = subprocess.run([*CLI, "train", "genomic", "--data", str(bad), "--storage", str(tmp_path / "runs"),
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    error = r.stderr.split("medray: error:", 1)[-1]
    assert "s2" in error and "'X'" in error, r.stderr
    assert "log" in r.stderr.splitlines()[-1]  # and where Ray's own output went


def test_plain_progress_lines_say_how_long_is_left(capsys):
    """The driver side of the display, fed events by hand (no Ray): time left from the pace."""
    from medray import console

    d = console._Display("genomic poscnn", 4)
    d.event({"kind": "epoch", "epoch": 1, "epochs": 4, "train_loss": 1.0, "val_accuracy": 0.5, "seconds": 2.0})
    d.event({"kind": "step", "epoch": 2, "step": 3, "steps": 10})  # plain mode: no line for steps
    d.event({"kind": "epoch", "epoch": 2, "epochs": 4, "train_loss": 0.5, "val_accuracy": 0.7, "seconds": 0.1,
             "resumed_from_epoch": 1})
    d.close(ok=True)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[medray] genomic poscnn epoch 1/4  loss 1.0000  val_acc 0.500")
    assert "left ~0:06" in out[0]  # 3 epochs to go at the first epoch's 2 s
    assert "resumed from the checkpoint of epoch 1" in out[1]
    assert out[2].startswith("[medray] genomic poscnn epoch 2/4") and len(out) == 3


def test_quiet_inside_a_process_leaves_the_callers_ray_and_streams_alone(ray_session, tmp_path, capsys):
    """`medray.cli.main` called from Python (a notebook, a test): the caller's Ray stays up, medray's
    lines reach the caller's sys.stdout, and the display mode set inside does not outlive the call."""
    import ray

    from medray import console

    with console.quiet("train", folder=tmp_path) as log:
        console.set_mode(live=False, epoch_lines=False)
        console.say("[medray] hello")
        os.write(1, b"ray noise\n")  # what Ray's C++ side and subprocesses write to fd 1: the log
    assert ray.is_initialized()
    assert capsys.readouterr().out == "[medray] hello\n"
    assert "ray noise" in log.read_text() and "[medray] hello" in log.read_text()
    assert console._State.epoch_lines is True and console._State.terminal is None
