"""Serving throughput and latency: medray's Ray Serve app vs. a plain uvicorn server vs. in-process.

For each model (exercise, ultrasound, genomic) and each request size (1 and 64 instances per
request), `wrk` (C, one thread, a Lua script for the POST body) drives each server on loopback at
concurrency 1, 8 and 64, and reports requests/s and latency percentiles; instances/s = requests/s ×
instances per request. The in-process ceiling is `Bundle.predict` on batches of 64 already-parsed
inputs in this process (no HTTP, no parsing). Everything runs in one invocation on one machine,
so the ratios are comparable.

    python benchmarks/serving.py --bundles .medray-demo/bundles            # after `make demo`
    python benchmarks/serving.py --bundles DIR --duration 5 --out benchmarks/results/serving.md

Needs `wrk` (Debian/Ubuntu: `apt-get install wrk`; `make bench` installs it).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from medray.bundle import load_bundle  # noqa: E402

TASKS = ("exercise", "ultrasound", "genomic")
SHARED = ROOT.parent / "shared" / "data"


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


def drain(base: str, timeout_s: float = 180) -> None:
    """Wait until requests left over from a wrk run have been answered (healthz answers fast)."""
    import urllib.request

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    p.add_argument("--servers", nargs="+", default=["serve", "plain"])
    p.add_argument("--no-throughput-optimized", action="store_true")
    p.add_argument("--no-auth", action="store_true", help="Serve without token checks (the audit log stays on) "
                   "(to measure what they cost; deployments keep them on)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.md"))
    a = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install wrk (or `make bench`)")

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
    procs = []
    try:
        if "plain" in a.servers:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "plain_server.py"),
                                           "--port", str(port), *bundle_dirs.values()]))
            wait_http(f"http://127.0.0.1:{port}/healthz")
            servers["plain"] = f"http://127.0.0.1:{port}"
        if "serve" in a.servers:
            from serve.local import start

            tokens = tmp / "tokens"
            tokens.write_text(TOKEN + "\n")
            servers["serve"] = start(bundle_dirs, port=free_port(), throughput_optimized=not a.no_throughput_optimized,
                                     tokens_file=str(tokens), audit_log=str(tmp / "audit.jsonl"),
                                     no_auth=a.no_auth)
        for t in a.tasks:
            for n in a.sizes:
                body_file, ctype, body, _ = bodies[t, n]
                for name, base in servers.items():
                    url = f"{base}/v1/{t}/predict"
                    check_ok(url, body, ctype)
                    wrk(url, body_file, ctype, 8, 1.0)  # warm-up
                    for c in (a.concurrency if n == 1 else a.big_concurrency):
                        backlog_s = c * n / ceiling[t]  # seconds of model work in flight at once
                        if backlog_s > 20:
                            print(f"{t:<11}{n:>4}/req  {name:<6} c={c:<3} skipped: {backlog_s:.0f} s of work "
                                  "in flight would measure queueing, not serving", flush=True)
                            continue
                        # long enough for several rounds of the slowest requests (64 images each)
                        duration = min(60.0, max(a.duration, 4 * backlog_s))
                        r = wrk(url, body_file, ctype, c, duration)
                        drain(base)
                        row = {"task": t, "instances_per_request": n, "server": name, "concurrency": c,
                               "instances_per_s": r["rps"] * n, **r}
                        rows.append(row)
                        print(f"{t:<11}{n:>4}/req  {name:<6} c={c:<3} {r['rps']:>8.0f} req/s "
                              f"{r['rps'] * n:>9.0f} inst/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms"
                              f"  non-2xx {r['non2xx']} {r['socket_errors']}", flush=True)
    finally:
        for pr in procs:
            pr.terminate()
        if "serve" in servers:
            from ray import serve

            serve.shutdown()

    write_report(rows, ceiling, a)


def write_report(rows: list[dict], ceiling: dict, a) -> None:
    cmd = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    lines = [f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"{platform.processor() or platform.machine()})", "",
             f"Command: `{cmd}`  ", f"wrk, one thread, {a.duration:.0f} s per cell, loopback. "
             "Throughput in instances/s (requests/s × instances per request); latency p50/p99 in ms.", ""]
    lines += ["| model | inst/req | conc. | Serve inst/s | plain inst/s | Serve / plain | Serve / in-process | "
              "Serve p50 / p99 | plain p50 / p99 | errors (Serve, plain) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    key = {(r["task"], r["instances_per_request"], r["server"], r["concurrency"]): r for r in rows}
    for t in dict.fromkeys(r["task"] for r in rows):
        for n in dict.fromkeys(r["instances_per_request"] for r in rows):
            for c in dict.fromkeys(r["concurrency"] for r in rows):
                s, pl = key.get((t, n, "serve", c)), key.get((t, n, "plain", c))
                if s is None and pl is None:
                    continue

                def f(r, k, fmt="{:.0f}"):
                    return fmt.format(r[k]) if r and r.get(k) is not None else "–"

                ratio = f"{s['instances_per_s'] / pl['instances_per_s']:.2f}" if s and pl else "–"
                ceil = f"{s['instances_per_s'] / ceiling[t]:.2f}" if s else "–"
                lines.append(f"| {t} | {n} | {c} | {f(s, 'instances_per_s')} | {f(pl, 'instances_per_s')} | {ratio} | "
                             f"{ceil} | {f(s, 'p50_ms', '{:.1f}')} / {f(s, 'p99_ms', '{:.1f}')} | "
                             f"{f(pl, 'p50_ms', '{:.1f}')} / {f(pl, 'p99_ms', '{:.1f}')} | "
                             f"{f(s, 'non2xx')}, {f(pl, 'non2xx')} |")
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
