"""gunicorn settings for d3k2: sync workers, JSON logs from the app, Prometheus multi-process metrics.

Environment: D3K2_HOST / D3K2_PORT (bind), GUNICORN_WORKERS (default 2 x CPUs + 1, at most 8),
GUNICORN_TIMEOUT (seconds, default 30), PROMETHEUS_MULTIPROC_DIR (required: metrics of all workers),
D3K2_FORWARDED_ALLOW_IPS (the proxies whose X-Forwarded-* headers are believed; default none).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

bind = f"{os.environ.get('D3K2_HOST', '0.0.0.0')}:{os.environ.get('D3K2_PORT', '8080')}"  # noqa: S104
worker_class = "sync"
workers = int(os.environ.get("GUNICORN_WORKERS", str(min(8, 2 * (os.cpu_count() or 1) + 1))))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
graceful_timeout = 20
keepalive = 5
# gunicorn believes X-Forwarded-Proto/-For (and would let SCRIPT_NAME through) from 127.0.0.1 unless told
# otherwise: anyone on the host could then change the URL the app sees. Nobody is trusted unless the
# operator names the proxy; the JWT audience comes from D3K2_PUBLIC_BASE_URL, not from these headers.
forwarded_allow_ips = os.environ.get("D3K2_FORWARDED_ALLOW_IPS", "")
# SCRIPT_NAME / PATH_INFO as request headers from a trusted proxy: d3k2 is mounted at the root (a prefix
# belongs in D3K2_PUBLIC_BASE_URL), and one that does not prefix the path made gunicorn answer 500.
forwarder_headers = ""
# The app logs one JSON line per request (d3k2.http.logs); gunicorn's own access log would repeat it.
accesslog = None
errorlog = "-"
loglevel = os.environ.get("D3K2_LOG_LEVEL", "info").lower()
# gunicorn 25.1+ opens a control socket for `gunicornc` (worker count, reload, shutdown) at
# $XDG_RUNTIME_DIR/gunicorn.ctl or $HOME/.gunicorn/gunicorn.ctl: one path for every gunicorn of the user, so two
# instances on one host take it from each other, and a read-only root cannot have it. d3k2 is run by its
# orchestrator's signals, not by that socket.
control_socket_disable = True
# /tmp is a tmpfs in many container setups; workers heartbeat there.
worker_tmp_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None  # noqa: S108


def on_starting(server: Any) -> None:
    """Empty the metrics directory (counts of a previous run would be added) and migrate the database
    once, before workers start, so that they do not race to create tables."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not metrics_dir:
        raise RuntimeError("PROMETHEUS_MULTIPROC_DIR must be set under gunicorn (multi-process metrics)")
    directory = Path(metrics_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # The directory itself may be a tmpfs mount point: empty it, keep it.
    for entry in directory.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()

    from d3k2.config import from_env
    from d3k2.store.feedback import FeedbackStore
    from d3k2.store.schema import StoreUnavailable

    store = FeedbackStore(from_env().database)
    try:
        store.migrate()
    except StoreUnavailable:
        logging.getLogger("gunicorn.error").warning(
            "feedback database unreachable at startup; workers migrate when it is back"
        )
    finally:
        store.close()


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def worker_exit(server: Any, worker: Any) -> None:
    """In the exiting worker: write the cards served it still has queued (d3k2.store.served.ServedWriter
    batches them off the request path). atexit would do it too; this runs on every graceful exit, also
    when the worker is stopped after a timeout (SIGABRT). SIGKILL / OOM loses the last batch interval."""
    from d3k2.store.served import close_served_writers

    close_served_writers(timeout=float(graceful_timeout) / 2)
