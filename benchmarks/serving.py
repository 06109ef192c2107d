"""Serving throughput and latency: medray's Ray Serve app vs. its peers (a plain uvicorn server, LitServe
with dynamic batching) vs. in-process.

For each model (exercise, ultrasound, genomic) and each request size (1 and 64 instances per
request), `wrk` (C, one thread, a Lua script for the POST body) drives each server on loopback at
concurrency 1, 8 and 64, and reports requests/s and latency percentiles; instances/s = requests/s ×
instances per request. The in-process ceiling is `Bundle.predict` on batches of 64 already-parsed
inputs in this process (no HTTP, no parsing). Everything runs in one invocation on one machine,
so the ratios are comparable. The peers (`plain_server.py`, `litserve_server.py`) share Serve's routes,
request validation and model call; "Serve / best peer" divides Serve's throughput by the faster one's.
A peer is paused (SIGSTOP) while another server is measured: LitServe's idle batching workers poll
their queues every millisecond.

    python benchmarks/serving.py --bundles .medray-demo/bundles            # after `make demo`
    python benchmarks/serving.py --bundles DIR --duration 5 --out benchmarks/results/serving.md

Needs `wrk` (Debian/Ubuntu: `apt-get install wrk`) and, for the LitServe peer, `pip install -e '.[bench]'`;
`make bench` installs both.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from medray.bundle import load_bundle  # noqa: E402
from serve.local import free_port  # noqa: E402

TASKS = ("exercise", "ultrasound", "genomic")
SHARED = ROOT.parent / "shared" / "data"
SERVERS = {"serve": "Serve", "plain": "plain", "litserve": "LitServe"}  # name → how the report writes it
LITSERVE_BATCH = {"--max-batch-size": 64, "--batch-timeout": 0.005}  # requests per model call, seconds to fill
PEERS = {"plain": ["plain_server.py"],  # server scripts in benchmarks/ and their options
         "litserve": ["litserve_server.py", *(str(x) for kv in LITSERVE_BATCH.items() for x in kv)]}


# --------------------------------------------------------------------------- request bodies


def sample_inputs(task: str, bundle, n: int) -> tuple[bytes, str, object]:
    """(JSON body with n instances, content type, parsed raw inputs for the in-process run)."""
    rng = np.random.default_rng(0)
    if task == "exercise":
        names = bundle.preprocessor.feature_names
        src = SHARED / "exercise" / "exercise_windows.csv"
        if src.exists():
            import pandas as pd

            x = pd.read_csv(src, nrows=256)[names].to_numpy(np.float64)
        else:
            x = rng.normal(bundle.preprocessor.mean, bundle.preprocessor.std, (256, len(names)))
        x = x[rng.integers(0, len(x), n)]
        return json.dumps({"instances": x.tolist()}).encode(), "application/json", x.astype(np.float32)
    if task == "genomic":
        src = SHARED / "genomic" / "splice.fasta"
        if src.exists():
            from medray.data.genomic import read_genomic

            seqs = read_genomic(str(src)).inputs[:256]
        else:
            seqs = ["".join(rng.choice(list("ACGT"), bundle.preprocessor.length)) for _ in range(256)]
        seqs = [seqs[i] for i in rng.integers(0, len(seqs), n)]
        return json.dumps({"sequences": seqs}).encode(), "application/json", seqs
    root = SHARED / "ultrasound"
    files = sorted(root.glob("*/*.png"))[:256] if root.exists() else []
    if not files:
        from PIL import Image

        tmp = Path(tempfile.mkdtemp())
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp / f"{i}.png")
        files = sorted(tmp.glob("*.png"))
    chosen = [files[i] for i in rng.integers(0, len(files), n)]
    blobs = [p.read_bytes() for p in chosen]
    from medray.data.ultrasound import decode_image

    images = np.stack([decode_image(b, bundle.preprocessor.size) for b in blobs])
    body = json.dumps({"images": [base64.b64encode(b).decode() for b in blobs]}).encode()
    return body, "application/json", images


# --------------------------------------------------------------------------- load generator


LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "{ctype}"
wrk.headers["Authorization"] = "Bearer {token}"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
"""


# Serve runs with authentication on, as deployed (the plain server ignores the header): the
# benchmark's own throwaway token, in a tokens file it writes.
TOKEN = secrets.token_urlsafe(32)


def wrk(url: str, body_file: str, ctype: str, concurrency: int, duration: float) -> dict:
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text(LUA.format(ctype=ctype, body=body_file, token=TOKEN))
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "60s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    if not m:
        raise RuntimeError(f"wrk failed: {out[-500:]}")
    secs = float(m.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(3)]
    rps = int(m.group(1)) / secs  # wrk's own Requests/sec line rounds to 2 decimals
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)", out)
        if m:
            v = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
            lat[pct] = v
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors:.*", out)
    return {"rps": rps, "p50_ms": lat.get("50"), "p99_ms": lat.get("99"),
            "non2xx": int(errors.group(1)) if errors else 0, "socket_errors": sock.group(0) if sock else ""}


def wait_http(url: str, timeout_s: float = 120) -> None:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} not up after {timeout_s}s")


def drain(base: str, probe: tuple[str, bytes, str], timeout_s: float = 180) -> None:
    """Wait until requests left over from a wrk run have been answered: `probe` (url, body, content
    type), a small request to the model just measured, waits behind them in its queue (LitServe's
    /healthz, like Serve's, is answered without the model); then until healthz answers fast."""
    import urllib.request

    with contextlib.suppress(OSError, ValueError):
        check_ok(*probe)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        t0 = time.perf_counter()
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=timeout_s).read()
        except OSError:
            pass
        if time.perf_counter() - t0 < 0.05:
            return
        time.sleep(0.5)


def check_ok(url: str, body: bytes, ctype: str) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def start_peer(name: str, bundle_dirs: list[str]) -> tuple[subprocess.Popen, str]:
    """A peer server in its own process group (LitServe starts worker processes), once /healthz answers."""
    port = free_port()
    script, *options = PEERS[name]
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *options, "--port", str(port),
                             *bundle_dirs], start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
    except RuntimeError:
        stop_peer(proc)
        raise
    return proc, base


def run_only(name: str, peers: dict[str, subprocess.Popen]) -> None:
    """Let the peer `name` run (none for Serve) and pause the others, so that their background work
    takes no CPU from the server measured."""
    for peer, proc in peers.items():
        os.killpg(proc.pid, signal.SIGCONT if peer == name else signal.SIGSTOP)


def stop_peer(proc: subprocess.Popen) -> None:
    """SIGTERM (the server's own shutdown, up to 55 s), up to 5 s more for its helper processes to exit
    after it, then SIGKILL to whatever is left of its process group."""
    os.killpg(proc.pid, signal.SIGCONT)
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=55)
    deadline = time.time() + 5
    try:
        while time.time() < deadline:
            os.killpg(proc.pid, 0)
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def litserve_installed() -> bool:
    try:
        import litserve  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- main


def in_process(bundle, inputs, seconds: float = 2.0) -> float:
    """Instances/s of Bundle.predict on batches of len(inputs) (parsed inputs, no HTTP)."""
    import torch

    torch.set_num_threads(1)
    bundle.predict(inputs)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        bundle.predict(inputs)
        n += len(inputs)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundles", default=str(ROOT / ".medray-demo" / "bundles"),
                   help="directory with one bundle per task (exercise/, ultrasound/, genomic/)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 64])
    p.add_argument("--sizes", nargs="+", type=int, default=[1, 64], help="instances per request")
    p.add_argument("--big-concurrency", nargs="+", type=int, default=[8, 64],
                   help="concurrency levels for requests of more than one instance")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--servers", nargs="+", choices=list(SERVERS),
                   help="default: all three (litserve where it is installed: pip install -e '.[bench]')")
    p.add_argument("--no-throughput-optimized", action="store_true")
    p.add_argument("--no-auth", action="store_true", help="Serve without token checks (the audit log stays on) "
                   "(to measure what they cost; deployments keep them on)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.md"))
    a = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk (or `make bench`)")
    if a.servers is None:
        a.servers = list(SERVERS)
        if not litserve_installed():
            a.servers.remove("litserve")
            print("note: litserve not installed (pip install -e '.[bench]'): the LitServe peer is skipped", flush=True)
    elif "litserve" in a.servers and not litserve_installed():
        sys.exit("litserve not installed: pip install -e '.[bench]' (or `make bench`)")

    bundle_dirs = {t: str(Path(a.bundles) / t) for t in a.tasks}
    bundles = {t: load_bundle(d) for t, d in bundle_dirs.items()}
    tmp = Path(tempfile.mkdtemp(prefix="medray-bench-"))
    bodies = {}
    for t in a.tasks:
        for n in a.sizes:
            body, ctype, parsed = sample_inputs(t, bundles[t], n)
            f = tmp / f"{t}-{n}.json"
            f.write_bytes(body)
            bodies[t, n] = (str(f), ctype, body, parsed)

    rows = []
    ceiling = {}
    for t in a.tasks:
        parsed = bodies[t, max(a.sizes)][3]
        ceiling[t] = in_process(bundles[t], parsed)
        print(f"in-process {t}: {ceiling[t]:.0f} instances/s (batches of {len(parsed)})", flush=True)

    servers = {}
    procs = {}
    try:
        for name in PEERS:
            if name in a.servers:
                procs[name], servers[name] = start_peer(name, list(bundle_dirs.values()))
        if "serve" in a.servers:
            from serve.local import start

            tokens = tmp / "tokens"
            tokens.write_text(TOKEN + "\n")
            servers["serve"] = start(bundle_dirs, port=free_port(span=17), throughput_optimized=not a.no_throughput_optimized,
                                     tokens_file=str(tokens), audit_log=str(tmp / "audit.jsonl"),
                                     no_auth=a.no_auth)
        for t in a.tasks:
            probe_body = bodies[t, min(a.sizes)][2]
            for n in a.sizes:
                body_file, ctype, body, _ = bodies[t, n]
                for name, base in servers.items():
                    run_only(name, procs)
                    url = f"{base}/v1/{t}/predict"
                    check_ok(url, body, ctype)
                    wrk(url, body_file, ctype, 8, 1.0)  # warm-up
                    for c in (a.concurrency if n == 1 else a.big_concurrency):
                        backlog_s = c * n / ceiling[t]  # seconds of model work in flight at once
                        if backlog_s > 20:
                            print(f"{t:<11}{n:>4}/req  {name:<8} c={c:<3} skipped: {backlog_s:.0f} s of work "
                                  "in flight would measure queueing, not serving", flush=True)
                            continue
                        # long enough for several rounds of the slowest requests (64 images each)
                        duration = min(60.0, max(a.duration, 4 * backlog_s))
                        r = wrk(url, body_file, ctype, c, duration)
                        drain(base, (url, probe_body, ctype))
                        row = {"task": t, "instances_per_request": n, "server": name, "concurrency": c,
                               "instances_per_s": r["rps"] * n, **r}
                        rows.append(row)
                        print(f"{t:<11}{n:>4}/req  {name:<8} c={c:<3} {r['rps']:>8.0f} req/s "
                              f"{r['rps'] * n:>9.0f} inst/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
                              f"  non-2xx {r['non2xx']} {r['socket_errors']}", flush=True)
    finally:
        for pr in procs.values():
            stop_peer(pr)
        if "serve" in servers:
            from ray import serve

            serve.shutdown()

    write_report(rows, ceiling, a)


def write_report(rows: list[dict], ceiling: dict, a) -> None:
    cmd = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    ran = [s for s in SERVERS if any(r["server"] == s for r in rows)]
    peers = [s for s in ran if s != "serve"]
    lines = [f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()})", "",
             f"Command: `{cmd}`  ", f"wrk, one thread, {a.duration:.0f} s per cell, loopback. "
             "Throughput in instances/s (requests/s × instances per request); latency p50/p99 in ms."
             + (f" LitServe batches dynamically (up to {LITSERVE_BATCH['--max-batch-size']} requests per model "
                f"call, {LITSERVE_BATCH['--batch-timeout'] * 1e3:g} ms batch timeout)." if "litserve" in ran else "")
             + ' "Serve / best peer": over the faster peer, named.', ""]
    head = ([f"{SERVERS[s]} inst/s" for s in ran] + (["Serve / best peer"] if "serve" in ran and peers else [])
            + (["Serve / in-process"] if "serve" in ran else []) + [f"{SERVERS[s]} p50 / p99" for s in ran]
            + [f"errors ({', '.join(SERVERS[s] for s in ran)})"])
    lines += ["| model | inst/req | conc. | " + " | ".join(head) + " |", "|---" * (3 + len(head)) + "|"]
    key = {(r["task"], r["instances_per_request"], r["server"], r["concurrency"]): r for r in rows}

    def f(r, k, fmt="{:.0f}"):
        return fmt.format(r[k]) if r and r.get(k) is not None else "–"

    for t in dict.fromkeys(r["task"] for r in rows):
        for n in dict.fromkeys(r["instances_per_request"] for r in rows):
            for c in dict.fromkeys(r["concurrency"] for r in rows):
                cell = {s: key.get((t, n, s, c)) for s in ran}
                if not any(cell.values()):
                    continue
                sv = cell.get("serve")
                cols = [f(cell[x], "instances_per_s") for x in ran]
                if "serve" in ran and peers:
                    measured = [x for x in peers if cell[x]]
                    best = max(measured, key=lambda x: cell[x]["instances_per_s"], default=None)
                    cols.append(f"{sv['instances_per_s'] / cell[best]['instances_per_s']:.2f} ({SERVERS[best]})"
                                if sv and best else "–")
                if "serve" in ran:
                    cols.append(f"{sv['instances_per_s'] / ceiling[t]:.2f}" if sv else "–")
                cols += [f"{f(cell[x], 'p50_ms', '{:.1f}')} / {f(cell[x], 'p99_ms', '{:.1f}')}" for x in ran]
                cols.append(", ".join(f(cell[x], "non2xx") for x in ran))
                lines.append(f"| {t} | {n} | {c} | " + " | ".join(cols) + " |")
    lines += ["", "In-process ceiling (Bundle.predict on batches, parsed inputs): "
              + ", ".join(f"{t} {v:.0f} inst/s" for t, v in ceiling.items()), ""]
    text = "\n".join(lines)
    print("\n" + text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "ceiling": ceiling, "command": cmd}, indent=1))
    print(f"written to {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
