"""Keeps a spawned data-plane process alive: restarts it with backoff when it exits or hangs.

`serve` uses it when it started the data plane itself (with `--attach` there is no process to
supervise: the engine just keeps reconnecting until the external worker is back). The supervisor
only manages the process; the engine notices the lost connection, fails requests and handshakes
again. Before the first successful handshake a dying worker is reported, not restarted, so a
broken configuration fails start-up instead of looping. No torch, no request state here.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Callable

from controlplane.launcher import stop_process

log = logging.getLogger(__name__)

Spawn = Callable[[], "subprocess.Popen[bytes]"]


class Supervisor:
    def __init__(
        self,
        spawn: Spawn,
        *,
        on_exit: Callable[[str], None] = lambda reason: None,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        poll_s: float = 0.1,
        kill_after_s: float = 2.0,
    ) -> None:
        self._spawn = spawn
        self.on_exit = on_exit
        self._initial_backoff = backoff_s
        self._backoff = backoff_s
        self._max_backoff = max_backoff_s
        self._poll_s = poll_s
        self._kill_after_s = kill_after_s
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._armed = False  # restart only after a worker has once been ready
        self._task: asyncio.Task[None] | None = None
        self._killer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.child = self._spawn()
        self._task = asyncio.create_task(self._watch(), name="dataplane-supervisor")

    def child_pid(self) -> int | None:
        """The pid of the child last started (None: none yet), running or not: only it may answer."""
        return self.child.pid if self.child is not None else None

    def worker_ready(self, *_: object) -> None:
        """A handshake succeeded: arm restarts and reset the backoff."""
        self._armed = True
        self._backoff = self._initial_backoff

    def dataplane_lost(self, reason: str) -> None:
        """The engine gave up on the worker (timeout, fatal, dropped): make sure the process goes."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        log.warning("stopping data plane pid %d: %s", child.pid, reason)
        child.terminate()
        self._killer = asyncio.create_task(self._kill_later(child))

    async def _kill_later(self, child: subprocess.Popen[bytes]) -> None:
        await asyncio.sleep(self._kill_after_s)
        if child.poll() is None:
            log.warning("data plane pid %d ignored SIGTERM; killing it", child.pid)
            child.kill()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            child = self.child
            if child is None or child.poll() is None:
                continue
            reason = f"data plane (pid {child.pid}) exited with code {child.returncode}"
            log.error("%s", reason)
            self.on_exit(reason)
            if not self._armed:
                self.child = None
                return
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, self._max_backoff)
            self.child = self._spawn()
            self.restarts += 1
            log.info("restarted the data plane (pid %d, restart %d)", self.child.pid, self.restarts)

    async def stop_restarting(self) -> None:
        """No more restarts (the control plane is about to tell the worker to exit)."""
        for task in (self._task, self._killer):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._killer = None

    async def stop(self) -> None:
        """No more restarts; stop the current process (SIGTERM, then SIGKILL) and reap it."""
        await self.stop_restarting()
        if self.child is not None:
            await asyncio.to_thread(stop_process, self.child)
            self.child = None
