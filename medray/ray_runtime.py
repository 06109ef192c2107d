"""Connecting to Ray: an existing cluster when one is given, else a local instance.

The local instance advertises more logical CPUs than the machine has (at least 8): with
`num_cpus` equal to the cores, two training workers (1 CPU each) would take every CPU on a
2-core laptop, leaving none for Ray Data's read/split tasks and the Train controller, and the
job would hang waiting for resources. The workers are mostly waiting on each other and on
data, so over-subscribing logical CPUs costs little; torch threads per worker are capped by Ray
(OMP_NUM_THREADS = the worker's CPUs).

`medray serve`'s local instance starts without Ray's dashboard: on a 2-core machine the
dashboard's head process takes ray.init from ~4.5 s to ~11 s, a third of the start-up. Serve does
not need it, and each node's metrics agent (what `/metrics` reads) still starts. Training keeps it:
Ray Train polls Ray's state API, which the dashboard serves, and warns with a stack trace on every
poll without it. MEDRAY_RAY_DASHBOARD=1 or 0 overrides both. A cluster started with `ray start`
has a dashboard of its own (jobs submitted with `medray submit` go through it).
"""

from __future__ import annotations

import logging
import os

LOCAL_MIN_CPUS = 8
TRAIN_POLL_S = 0.2


def local_num_cpus() -> int:
    return max(LOCAL_MIN_CPUS, 2 * (os.cpu_count() or 1))


def local_dashboard(default: bool) -> bool:
    """Whether a local instance starts Ray's dashboard: MEDRAY_RAY_DASHBOARD (1/0) when set, else `default`."""
    value = os.environ.get("MEDRAY_RAY_DASHBOARD", "").strip().lower()
    return default if not value else value in ("1", "true", "yes")


def ensure_ray(address: str | None = None, quiet: bool = True, dashboard: bool | None = None):
    """Initialise Ray once: `address` (or RAY_ADDRESS) joins a cluster; otherwise local, with Ray's
    dashboard if `dashboard` (default: `local_dashboard(True)`)."""
    import ray

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(
        logging_level=logging.WARNING if quiet else logging.INFO,
        configure_logging=True,
        log_to_driver=True,
        # Workers must import medray: the installed package, or this checkout when run from it.
        runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1",
                                  # the Train controller collects each epoch's report when it polls the
                                  # workers (every 2 s by default) and a worker's next report waits for
                                  # that: with epochs of a fraction of a second, 2 s per epoch
                                  "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
                                      "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_S))}},
    )
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": a new instance even when `ray start` left a cluster (or its address file) here
        ray.init(address="local", num_cpus=local_num_cpus(),
                 include_dashboard=local_dashboard(True) if dashboard is None else dashboard, **kwargs)
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray
