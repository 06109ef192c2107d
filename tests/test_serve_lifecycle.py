"""`medray serve` as a user (or Kubernetes, or systemd) runs it: its own process, its own Ray
instance. A port already taken fails at once, naming who holds it; SIGTERM and Ctrl-C (SIGINT)
stop it cleanly while four clients keep it busy: requests in flight are answered, the exit status
is 0, one line and no stack dump on the way out, and the port is free again."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT, free_port

TOKEN = "lifecycle-test-token-" + "t" * 16
SEQS = {"sequences": ["ACGT" * 15] * 64}


def _env() -> dict:
    # not the session's Serve settings (its direct-ingress port): this process starts its own Ray
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_TRAIN_V2_ENABLED"] = "1"
    return env


def _cmd(bundle, port: int, tokens) -> list[str]:
    return [sys.executable, "-m", "medray", "serve", str(bundle), "--port", str(port), "--tokens-file", str(tokens)]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_port_in_use_fails_at_once_naming_who_holds_it(trained, tmp_path):
    _, bundle, _ = trained("genomic")
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    port = free_port(span=17)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        t0 = time.time()
        r = subprocess.run(_cmd(bundle, port, tmp_path / "tokens"), capture_output=True, text=True, timeout=300,
                           cwd=ROOT, env=_env())
        took = time.time() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is in use by pid {os.getpid()}" in r.stderr, r.stderr[-2000:]
    assert took < 60, f"took {took:.0f} s: the port is checked before Ray and Serve start (~30 s here)"


def _load(url: str, stop: threading.Event, log: list):
    """Requests of 64 sequences one after another until `stop`: (start, end, status or error)."""
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        while not stop.is_set():
            t0 = time.time()
            try:
                outcome = c.post(f"{url}/v1/genomic/predict", json=SEQS).status_code
            except httpx.HTTPError as e:
                outcome = type(e).__name__
            log.append((t0, time.time(), outcome))
            if not isinstance(outcome, int):
                time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_requests_and_exits_0_with_one_line(trained, tmp_path, sig):
    _, bundle, _ = trained("genomic")
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    port = free_port(span=17)
    url = f"http://127.0.0.1:{port}"
    err = tmp_path / "stderr.txt"
    p = subprocess.Popen(_cmd(bundle, port, tmp_path / "tokens"), stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                         cwd=ROOT, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and p.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"not ready within 240 s (exit {p.poll()}): {err.read_text()[-3000:]}")
        stop, log = threading.Event(), []
        clients = [threading.Thread(target=_load, args=(url, stop, log), daemon=True) for _ in range(4)]
        for c in clients:
            c.start()
        time.sleep(3)
        t_signal = time.time()
        p.send_signal(sig)
        code = p.wait(timeout=120)
        stop.set()
        for c in clients:
            c.join(timeout=70)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = err.read_text()
    assert code == 0, text[-3000:]
    for crash in ("*** SIGTERM received", "Aborted", "Traceback", "*** SIGINT received"):
        assert crash not in text, text[-3000:]
    after = text.split("[medray] serving", 1)[1].splitlines()[1:]  # what it printed once serving
    assert len(after) == 1 and after[0].startswith(f"[medray] stopped ({sig.name})"), after
    before = [o for t0, t1, o in log if t1 < t_signal]
    in_flight = [o for t0, t1, o in log if t0 < t_signal <= t1]
    assert before and all(o == 200 for o in before), before[:5]
    assert in_flight and all(o == 200 for o in in_flight), in_flight  # answered, not cut off
    assert not _listening(port), f"port {port} still taken after the stop"


def test_a_stop_during_the_start_up_is_clean_too(trained, tmp_path):
    """SIGTERM after Ray is up but before the models are ready (a pod deleted while it starts):
    exit 0 and one line, not Ray's stack dump."""
    _, bundle, _ = trained("genomic")
    (tmp_path / "tokens").write_text(TOKEN + "\n")
    port = free_port(span=17)
    err = tmp_path / "stderr.txt"
    p = subprocess.Popen(_cmd(bundle, port, tmp_path / "tokens"), stdout=subprocess.DEVNULL, stderr=open(err, "w"),
                         cwd=ROOT, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 180
        while "Ray is up" not in err.read_text() and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)
        assert "Ray is up" in err.read_text(), err.read_text()[-3000:]
        time.sleep(1)  # Serve is starting
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = err.read_text()
    assert code == 0, text[-3000:]
    for crash in ("*** SIGTERM received", "Aborted", "Traceback"):
        assert crash not in text, text[-3000:]
    assert "[medray] stopped (SIGTERM) during the start-up" in text, text[-3000:]
    assert "[medray] serving" not in text
    assert not _listening(port)
