"""The lab's processes: servers it starts and waits for, children it spawns with their logs,
the first one that dies named with the tail of its log, and every one of them stopped on
the way out. No child outlives the lab: each runs in a session of its own (a terminal's
Ctrl-C reaches the lab alone, which then stops them in order) and carries a parent-death
signal (tools.orphan), so the kernel stops them should the lab itself be killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.protocol.errors import KvmeshError
from pipeline.tools.orphan import wrap
from pipeline.tools.servers import ServerProcess, start_all


class LabError(KvmeshError):
    """A lab could not start, or a child of it died."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Supervisor:
    root: Path
    children: list[Child] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)

    def start_servers(self, servers: list[ServerProcess]) -> None:
        start_all(servers)
        self.servers += servers

    def spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> Child:
        log = self.root / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                wrap(cmd),
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.root,
                start_new_session=True,
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def check(self) -> None:
        """Raise LabError naming the first child or server that died, with its log."""
        for child in self.children:
            rc = child.popen.poll()
            if rc is not None:
                raise LabError(
                    f"{child.name} exited with code {rc}; last lines of "
                    f"{child.log}:\n{child.tail()}"
                )
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is not None:
                raise LabError(
                    f"{s.name} on port {s.port} exited with code "
                    f"{s.proc.returncode}; see {s.log_path}"
                )

    def wait_logs(self, names: list[str], text: str, timeout: float) -> None:
        """Wait until each named child printed *text* (what `kvmesh simulate` prints once
        it populated its cluster), raising as soon as any child dies."""
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending:
            self.check()
            for child in self.children:
                if child.name in pending and text in child.tail(200):
                    pending.discard(child.name)
            if time.monotonic() > deadline:
                raise LabError(f"timed out waiting for {', '.join(sorted(pending))}")
            time.sleep(0.2)  # poll interval while children start

    def signal(self, prefix: str, signum: int) -> None:
        for child in self.children:
            if child.name.startswith(prefix) and child.popen.poll() is None:
                child.popen.send_signal(signum)

    def stop(self) -> None:
        """Stop every child, then every server; SIGKILL whatever does not stop in time."""
        for child in self.children:
            if child.popen.poll() is None:
                child.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(max(0.1, deadline - time.monotonic()))
            if child.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.popen.pid, signal.SIGKILL)
                child.popen.wait(5)
        for s in self.servers:
            s.stop()
