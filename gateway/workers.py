"""`serve` with `listen.workers > 1`: a supervisor running that many gateway processes on one port.

Each worker is a whole gateway (`serve --worker`): its own event loop, store connection and upstream
connections, all on the same database, like replicas. They listen with SO_REUSEPORT, so the kernel
spreads connections across them. The supervisor forwards SIGTERM/SIGINT (drain) and SIGHUP (reload),
starts a worker again when one dies, and gives the workers one directory for prometheus_client's
multiprocess mode, so any worker's `/metrics` counts the requests of all of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

from prometheus_client import multiprocess

from .app import refuse_open_listener
from .config import Config
from .metrics import MULTIPROC_ENV
from .reload import WORKER_ENV

log = logging.getLogger("agnes_gateway.workers")

#: A worker that dies this soon after starting is failing to start, not crashing now and then.
EARLY_EXIT_S = 5.0
#: Give up (and stop every worker) after this many early exits in a row.
MAX_EARLY_EXITS = 3
#: How often the supervisor looks at its workers.
WATCH_INTERVAL_S = 0.2


class Supervisor:
    """Starts `count` workers with `command`, keeps them running, and stops them on a signal."""

    def __init__(self, command: Sequence[str], count: int, drain_s: float) -> None:
        self.command = list(command)
        self.count = count
        self.drain_s = drain_s
        self.workers: list[tuple[subprocess.Popen[bytes], float]] = []
        self._stop: int | None = None
        self._reload = False
        self._early_exits = 0
        self.directory = ""

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; the exit status is 0 after a clean stop, 1 if workers could not start."""
        self.directory = directory = tempfile.mkdtemp(prefix="agnes-gateway-metrics-")
        env = {**os.environ, MULTIPROC_ENV: directory, WORKER_ENV: "1"}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            self.workers = [self._start(env) for _ in range(self.count)]
            log.info("%d workers started (pids %s)", self.count, ", ".join(str(p.pid) for p, _ in self.workers))
            status = self._watch(env)
            self._stop_all(signal.SIGTERM if self._stop is None else self._stop)
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(directory, ignore_errors=True)

    def _start(self, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], float]:
        # A SIGHUP passed on while a worker is still starting must not kill it (the default action):
        # it starts with SIGHUP ignored, until its own handler is installed (it reads the config then anyway).
        proc = subprocess.Popen(self.command, env=env, preexec_fn=_ignore_hangup)
        return proc, time.monotonic()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True
        else:
            self._stop = signum

    def _watch(self, env: dict[str, str]) -> int:
        while self._stop is None:
            if self._reload:
                self._reload = False
                log.info("reload: passing SIGHUP to %d workers", len(self.workers))
                for proc, _ in self.workers:
                    proc.send_signal(signal.SIGHUP)
            for i, (proc, started) in enumerate(self.workers):
                code = proc.poll()
                if code is None or self._stop is not None:
                    continue
                self._worker_died(proc.pid)
                if time.monotonic() - started < EARLY_EXIT_S:
                    self._early_exits += 1
                    if self._early_exits >= MAX_EARLY_EXITS:
                        log.error(
                            "worker %d exited with %d right after starting, %d times: stopping",
                            proc.pid,
                            code,
                            MAX_EARLY_EXITS,
                        )
                        return 1
                else:
                    self._early_exits = 0
                log.warning("worker %d exited with %d; starting another", proc.pid, code)
                self.workers[i] = self._start(env)
            time.sleep(WATCH_INTERVAL_S)
        return 0

    def _worker_died(self, pid: int) -> None:
        """Its counters stay counted; only its live gauges (if any) are dropped."""
        multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]

    def _stop_all(self, signum: int) -> None:
        """Pass the stop on; workers drain for up to `drain_s`, and are killed a little after that."""
        for proc, _ in self.workers:
            if proc.poll() is None:
                proc.send_signal(signum)
        deadline = time.monotonic() + self.drain_s + 5.0
        for proc, _ in self.workers:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in time: killing it", proc.pid)
                proc.kill()
                proc.wait()
        log.info("all workers stopped")


def _ignore_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def worker_command(config_path: str | None, config: Config, uvloop: bool) -> list[str]:
    """The command line of one worker: the same config, host and port, marked as a worker."""
    command = [sys.executable, "-m", "gateway", "serve", "--worker"]
    if config_path is not None:
        command += ["--config", config_path]
    command += ["--host", config.listen.host, "--port", str(config.listen.port)]
    if uvloop:
        command.append("--uvloop")
    return command


def supervise(config: Config, config_path: str | None, *, uvloop: bool) -> int:
    """Run `config.listen.workers` workers until stopped; the command's exit status."""
    if config.listen.port == 0:
        raise SystemExit("listen.port 0 cannot be shared by several workers: choose a port")
    refuse_open_listener(config)
    command = worker_command(config_path, config, uvloop)
    return Supervisor(command, config.listen.workers, config.shutdown.drain_s).run()
