"""Worker processes for ``modelseal serve --workers N``: one listening socket per worker.

uvicorn's own ``--workers`` shares one listening socket between its workers. A worker that wakes
first accepts every connection waiting in the queue, so a burst of keep-alive connections (a
load balancer's pool, a benchmark's clients) often lands on one worker and stays there: the
other workers idle while one core does all the work (docs/benchmarks.md measured 8 of 8
connections on one of two workers in most runs). Here each worker binds its own socket with
``SO_REUSEPORT`` and the kernel spreads new connections over them by a hash of the addresses.

The parent holds the port (bound, never listening, so it is handed no connections), restarts a
worker that dies after it started, stops everything when one fails during start-up, and passes
SIGTERM/SIGINT on for uvicorn's graceful shutdown. Linux only lets processes of the same user
join a ``SO_REUSEPORT`` group; before binding, the parent checks that nothing else listens on the
port, so a second gateway started on the same port fails instead of quietly sharing its traffic.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import sys
import threading
import time
from typing import Any

from .errors import ConfigError

_log = logging.getLogger("uvicorn.error")

_STARTUP_FAILURE = 3  # uvicorn.config.STARTUP_FAILURE: the app or its socket could not start
_STOP_GRACE_S = 30.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _listener(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port), family=_family(host), reuse_port=True, backlog=2048)


def _hold_port(host: str, port: int) -> socket.socket:
    """Check that nothing listens on host:port, then bind (without listening) to keep it ours."""
    try:
        socket.create_server((host, port), family=_family(host)).close()  # no SO_REUSEPORT: any listener conflicts
        holder = socket.socket(_family(host), socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return holder


def _worker(app: str, host: str, port: int, options: dict[str, Any]) -> None:
    import uvicorn

    sock = _listener(host, port)
    server = uvicorn.Server(uvicorn.Config(app, factory=True, host=host, port=port, **options))
    server.run(sockets=[sock])
    if not server.started:
        sys.exit(_STARTUP_FAILURE)


def serve_workers(app: str, *, host: str, port: int, workers: int, options: dict[str, Any]) -> None:
    """Run ``workers`` uvicorn servers of the app factory ``app`` ("module:function") until stopped.

    Raises ``ConfigError`` if the port is taken or a worker fails to start.
    """
    holder = _hold_port(host, port)
    port = holder.getsockname()[1]  # port 0: the one the system chose, the same for every worker
    spawn = multiprocessing.get_context("spawn")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

    def start(index: int) -> Any:
        proc = spawn.Process(target=_worker, args=(app, host, port, options), name=f"modelseal-worker-{index}")
        proc.start()
        return proc

    failed: int | None = None
    procs = [start(i) for i in range(workers)]
    try:
        while not stop.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.is_alive():
                    continue
                if proc.exitcode == _STARTUP_FAILURE:
                    failed = proc.pid
                    stop.set()
                    break
                _log.warning("worker %s exited (code %s); starting another", proc.pid, proc.exitcode)
                procs[i] = start(i)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: uvicorn finishes the requests in flight, then exits
        deadline = time.monotonic() + _STOP_GRACE_S
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        holder.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed is not None:
        raise ConfigError(f"worker {failed} failed to start (its log is above)")
