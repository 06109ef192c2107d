"""`medray serve` started and stopped N times in a row on one port, as a process manager does it:
each cycle must become ready (GET /readyz 200) and answer a request, then stop on SIGTERM with
exit status 0 and no stack dump, leaving the port free for the next. Prints the start-up time
(process start → /readyz 200) and the stop time of every cycle, and their median and max.

    python benchmarks/serve_cycles.py --bundles .medray-demo/bundles --cycles 20

Results: results/serve_cycles.json and results/serve_cycles.md (the table docs/serving.md quotes).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve.local import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOKEN = "serve-cycles-benchmark-token-" + "x" * 12
CRASH = ("*** SIGTERM received", "Aborted", "Traceback")


def request(base: str, path: str, body: dict | None = None) -> int | None:
    """The status of one keep-alive request, its connection closed by this side (as a pooled
    client does): a connection the server closes lingers in TIME_WAIT on the server's port."""
    where = urlsplit(base)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        if body is None:
            conn.request("GET", path)
        else:
            conn.request("POST", path, json.dumps(body).encode(),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        r = conn.getresponse()
        r.read()
        return r.status
    except OSError:
        return None
    finally:
        conn.close()


def one_request(base: str, task: str) -> int:
    body = {"genomic": {"sequences": ["ACGT" * 15]},
            "exercise": None, "ultrasound": None}.get(task)
    if body is None:
        return 200  # only the genomic model gets a request (its inputs need no sample file)
    return request(base, f"/v1/{task}/predict", body)


def cycle(bundles: list[str], port: int, tokens: Path, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    cmd = [sys.executable, "-m", "medray", "serve", *bundles, "--port", str(port), "--tokens-file", str(tokens)]
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env, start_new_session=True)
    ready = None
    try:
        while time.time() - t0 < 300 and p.poll() is None:
            if request(base, "/readyz") == 200:
                ready = time.time() - t0
                break
            time.sleep(0.25)
        announced = None  # the "[medray] serving … (ready in N s)" line: the command's own start-up done
        while ready is not None and time.time() - t0 < 300 and p.poll() is None:
            if "[medray] serving" in log.read_text():
                announced = time.time() - t0
                break
            time.sleep(0.1)
        answered = one_request(base, "genomic") if ready is not None else None
        t1 = time.time()
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=180)
        stopped = time.time() - t1
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    with socket.socket() as s:
        port_free = s.connect_ex(("127.0.0.1", port)) != 0
    return {"ready_s": None if ready is None else round(ready, 2),
            "announced_s": None if announced is None else round(announced, 2), "request": answered, "exit": code,
            "stop_s": round(stopped, 2), "crash": [c for c in CRASH if c in text], "port_free": port_free}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundles", required=True, help="a folder of bundle folders, or one bundle folder")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--port", type=int, default=0, help="default: a free port (the same one every cycle)")
    a = ap.parse_args()
    root = Path(a.bundles)
    bundles = [str(root)] if (root / "bundle.json").exists() else \
        sorted(str(d) for d in root.iterdir() if (d / "bundle.json").exists())
    port = a.port or free_port(span=17)  # Serve's direct-ingress range
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve-cycles-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "tokens").write_text(TOKEN + "\n")
    rows = []
    for i in range(a.cycles):
        r = cycle(bundles, port, work / "tokens", work / f"cycle{i}.log")
        rows.append(r)
        print(f"cycle {i + 1:>2}/{a.cycles}: ready {r['ready_s']} s, request {r['request']}, exit {r['exit']}, "
              f"stop {r['stop_s']} s, crash {r['crash'] or 'none'}, port free {r['port_free']}", flush=True)
    ok = [r for r in rows if r["announced_s"] is not None and r["request"] == 200 and r["exit"] == 0
          and not r["crash"] and r["port_free"]]
    ready = [r["ready_s"] for r in rows if r["ready_s"] is not None]
    stops = [r["stop_s"] for r in rows]
    summary = {"command": "python benchmarks/serve_cycles.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M"), "models": [Path(b).name for b in bundles],
               "cycles": a.cycles, "clean_cycles": len(ok), "port": port,
               "ready_median_s": round(statistics.median(ready), 1) if ready else None,
               "ready_max_s": round(max(ready), 1) if ready else None,
               "stop_median_s": round(statistics.median(stops), 1), "stop_max_s": round(max(stops), 1),
               "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_cycles.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = [f"`{summary['command']}` ({summary['date']}, models: {', '.join(summary['models'])}, port {port})", "",
          "| cycles | clean (ready, answered, exit 0, no dump, port free) | ready median / max | stop median / max |",
          "|---|---|---|---|",
          f"| {a.cycles} | {len(ok)} | {summary['ready_median_s']} s / {summary['ready_max_s']} s | "
          f"{summary['stop_median_s']} s / {summary['stop_max_s']} s |"]
    (RESULTS / "serve_cycles.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    sys.exit(0 if len(ok) == a.cycles else 1)


if __name__ == "__main__":
    main()
