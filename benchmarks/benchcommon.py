"""What the benchmarks share: a one-pair mesh config and its --sync settings, starting and
stopping their processes, the make-mirror command, matplotlib (only needed for --png), the
project's byte code, the CPU time of processes from /proc, the workers' count of applied
operations, when writes landed in a target (Landing), and what a wait costs the machine
(WakeProbe)."""

from __future__ import annotations

import argparse
import bisect
import compileall
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# The checkout these scripts belong to. Its product is what they measure, in this process
# and in every child spawn() starts, whatever the working directory: a venv's editable
# install names another checkout (the main one, when a script runs from a worktree).
ROOT = Path(__file__).resolve().parent.parent
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))

from pipeline.clients.etcd import Etcd  # noqa: E402
from pipeline.protocol.names import stats_key  # noqa: E402
from pipeline.tools.meshconfig import mesh_config, new_signing_key, write_secret  # noqa: E402
from pipeline.tools.orphan import wrap  # noqa: E402
from pipeline.tools.servers import ServerProcess, find_binary, stop_all  # noqa: E402

SOURCE = "cluster-a"
ID_PREFIX = b"cilium/state/identities/v1/id/"
CACHE_PREFIX = f"cilium/cache/identities/v1/{SOURCE}/id/".encode()


def discard(*servers: ServerProcess) -> None:
    """Stop *servers* and delete their data dirs. A benchmark's etcd writes hundreds of MB
    a run (GBs at 500,000 keys), and such leftovers once filled the disk; the logs, beside
    the data dirs, stay."""
    stop_all(list(servers))
    for s in servers:
        shutil.rmtree(s.data_dir, ignore_errors=True)


def byte_compile(root: Path | None = None) -> None:
    """Write the byte code of kvmesh's own modules, as `pip install` does for a deployment.
    A development checkout has none while PYTHONDONTWRITEBYTECODE is set (as in this
    project's Dockerfile, and in some shells), and each process the benchmarks start would
    compile about 30 modules from source first: some 50 ms of a watcher's start."""
    root = root or Path(__file__).resolve().parent.parent
    for package in ("pipeline", "workers"):
        compileall.compile_dir(root / package, quiet=1)


def pair_config(
    path: Path,
    broker_url: str,
    source_url: str,
    target_url: str,
    sync: Mapping[str, Any] | None = None,
    more_targets: Iterable[tuple[str, str]] = (),
) -> Path:
    """Write a mesh config at *path*: SOURCE (a source only) → cluster-b (a target only),
    and to each of *more_targets* (name, endpoint), with a signing key beside it. Returns
    *path*."""
    targets = [("cluster-b", target_url), *more_targets]
    path.write_text(
        mesh_config(
            broker_url=broker_url,
            signing_key_file=write_secret(path.parent / "signing.key", new_signing_key()),
            clusters=[
                {"name": SOURCE, "id": 1, "endpoints": [source_url], "target": False},
                *(
                    {"name": name, "id": i, "endpoints": [url], "source": False}
                    for i, (name, url) in enumerate(targets, start=2)
                ),
            ],
            sync=sync,
        )
    )
    return path


def mirror_command(source_url: str, target_url: str) -> list[str]:
    """`etcdctl make-mirror` of the identity IDs into kvmesh's cache layout."""
    return [
        find_binary("etcdctl"),
        "--endpoints",
        source_url,
        "make-mirror",
        "--prefix",
        ID_PREFIX.decode(),
        "--dest-prefix",
        CACHE_PREFIX.decode(),
        target_url,
    ]


def add_sync_option(ap: argparse.ArgumentParser, example: str) -> None:
    ap.add_argument(
        "--sync",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"a [sync] setting for kvmesh (the value in JSON), e.g. {example} (repeatable)",
    )


def sync_settings(pairs: Iterable[str]) -> dict[str, Any]:
    """The [sync] settings of --sync KEY=VALUE options."""
    return {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in pairs)}


# a process a benchmark watches: one spawn() started, or a server's
Watched = subprocess.Popen[bytes] | ServerProcess
_LOGS: dict[int, Path] = {}  # the log of each process spawn() started, by pid


def spawn(
    procs: list[subprocess.Popen[bytes]],
    cmd: list[str],
    log: Path,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start *cmd* (dying with this process) with its output in *log*, in a session of its
    own: its CPU can be counted by session, and a worker's pool paused as one (killpg).
    It joins *procs*, for stop(). It runs this checkout's product, in its directory and
    with it first on PYTHONPATH (added to *env*, else to this process's environment):
    `python -m pipeline` would otherwise find the checkout of the working directory, or
    the one a venv's editable install names."""
    with open(log, "wb") as fh:
        p = subprocess.Popen(
            wrap(cmd),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=code_env(ROOT, env),
            cwd=ROOT,
            start_new_session=True,
        )
    procs.append(p)
    _LOGS[p.pid] = log
    return p


def stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process still running, then SIGKILL what is left after 30 s."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or a one-line exit naming the install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--png needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _commit(where: Path, *paths: str) -> str | None:
    """The commit checked out at *where* (short), with "+changes" if *paths* of it differ
    from that commit; None outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def provenance(code: Path | None = None) -> dict[str, Any]:
    """What a result was measured on: the product's commit (the checkout its `pipeline`
    package is imported from, or *code*), the benchmark scripts' commit, the machine's
    cores and the time."""
    import pipeline

    code = code or Path(pipeline.__file__).resolve().parent.parent
    return {
        "product": _commit(code, "pipeline", "workers"),
        "scripts": _commit(Path(__file__).resolve().parent, "."),
        "cores": os.cpu_count(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_json(rows: Any, path: str, code: Path | None = None) -> None:
    """Write a benchmark's results to *path* (its directory made if missing), and say so.
    Each row of a list, or the object, gets the `provenance` of the run (a row that has
    one keeps it: a list written again after each run keeps each row's own)."""
    where = provenance(code)
    if isinstance(rows, dict):
        rows = {**rows, "provenance": rows.get("provenance", where)}
    elif isinstance(rows, list):
        for row in rows:
            if isinstance(row, dict):
                row.setdefault("provenance", where)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path}")


def worker_command(config: Path, concurrency: int, pool: str) -> list[str]:
    """`kvmesh worker` for a benchmark's config, from this checkout's code. The solo pool has
    one slot per worker: *concurrency* of them run side by side, as one group
    (benchmarks/worker_group.py; see workers_ready)."""
    if pool == "solo" and concurrency > 1:
        group = (sys.executable, str(Path(__file__).parent / "worker_group.py"), str(concurrency))
        return [*group, *worker_command(config, 1, pool)]
    return [
        *(sys.executable, "-m", "pipeline", "worker", "--config", str(config)),
        *("--concurrency", str(concurrency), "--pool", pool),
    ]


def wait_for(
    what: str,
    check: Any,
    timeout: float,
    log: Path | None = None,
    alive: Iterable[Watched] = (),
) -> float:
    """Poll *check* until it holds, and return when it did (time.monotonic()). Exit naming
    *what* after *timeout* seconds, with the tail of *log* if given, or as soon as a process
    of *alive* has ended (check_alive)."""
    deadline = time.monotonic() + timeout
    alive = list(alive)
    while not check():
        check_alive(alive, what)
        if time.monotonic() > deadline:
            raise SystemExit(f"waiting for {what}: timed out{_tail(log)}")
        time.sleep(0.02)  # poll interval
    return time.monotonic()


def check_alive(procs: Iterable[Watched], what: str) -> None:
    """Exit naming *what* if a process of *procs* (a run's servers and the processes it
    spawned, none of which ends on its own) has ended, with its exit code and the tail of
    its log: a benchmark does not go on measuring, or waiting, without it."""
    for w in procs:
        proc, log = (w.proc, w.log_path) if isinstance(w, ServerProcess) else (w, _LOGS.get(w.pid))
        if proc is not None and proc.poll() is not None:
            raise SystemExit(
                f"waiting for {what}: {_shown(proc)} ended (code {proc.returncode}){_tail(log)}"
            )


def _tail(log: Path | None) -> str:
    return "\n" + log.read_text(errors="replace")[-1500:] if log and log.exists() else ""


def _shown(proc: subprocess.Popen[bytes]) -> str:
    """A process's command line as it was given (without wrap()'s prefix), cut short."""
    args = [str(a) for a in proc.args] if isinstance(proc.args, list) else [str(proc.args)]
    if args[1:3] == ["-m", "pipeline.tools.orphan"]:
        args = args[4:]
    return shlex.join(args)[:200]


def workers_ready(log: Path, pool: str, concurrency: int) -> bool:
    """Whether the workers of worker_command(_, *concurrency*, *pool*), logging to *log*,
    all consume: Celery logs "ready." once a worker does (a log line, but only as a
    benchmark's start signal), once per worker of a solo group."""
    wanted = concurrency if pool == "solo" else 1
    text = log.read_text(errors="replace") if log.exists() else ""
    return len(set(_READY.findall(text))) >= wanted  # by node: a restarted one counts once


_READY = re.compile(r"(\S+@\S+) ready\.$", re.MULTILINE)  # Celery's "node@host ready."


def code_env(code: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """*env* (this process's environment by default) for a child that must run the checkout
    at *code* (absolute: children change directory) ahead of whatever PYTHONPATH already
    names."""
    env = dict(os.environ if env is None else env)
    paths = [str(code.resolve()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(env, PYTHONPATH=os.pathsep.join(paths))


class WakeProbe:
    """A thread that only sleeps, *period* seconds at a time, and counts the CPU it is
    charged for it: what going to sleep and waking up costs on this machine while the
    probe runs (benchmarks/call_cost.py; in a virtual machine it moves with the host's
    load). It costs the machine one wakeup per period."""

    def __init__(self, period: float = 0.012) -> None:
        self.period = period
        self._stop = threading.Event()
        self._cpu = 0.0
        self._sleeps = 0
        self._thread = threading.Thread(target=self._run, name="wake-probe", daemon=True)

    def _run(self) -> None:
        cpu = time.thread_time()
        while not self._stop.is_set():
            time.sleep(self.period)
            self._sleeps += 1
        self._cpu = time.thread_time() - cpu

    @property
    def sleeps(self) -> int:
        return self._sleeps

    def start(self) -> WakeProbe:
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stop; the CPU charged per sleep, in µs (nan if none ended)."""
        self._stop.set()
        self._thread.join()
        return self._cpu / self._sleeps * 1e6 if self._sleeps else float("nan")


def applied_ops(stats: Any) -> int:
    """The workers' count of operations applied to SOURCE's target (the `ops_applied` field
    of the pair's stats hash in Redis; a pool process adds a task's once it has landed,
    routine counts up to 0.25 s later)."""
    return int(stats.hget(stats_key(SOURCE, "cluster-b"), "ops_applied") or 0)


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """How many cores the machine kept busy on average between two cpu_times() (None if
    no time passed between them)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total > 0 else None


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of one process so far, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def celery_main_cpu_seconds(sid: int) -> float:
    """User and system CPU seconds so far of the Celery main processes of session *sid*:
    those running Celery whose parent does not (a prefork worker's main process, which
    takes the tasks from Redis and hands them to its pool; with the solo pool, the whole
    worker)."""
    procs: dict[int, tuple[int, int, bool]] = {}  # pid: (ppid, ticks, runs celery)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != sid:
                continue
            celery = b"celery" in (stat.parent / "cmdline").read_bytes()
        except OSError:  # ended meanwhile
            continue
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), celery)
    ticks = sum(
        t for ppid, t, celery in procs.values() if celery and not procs.get(ppid, (0, 0, False))[2]
    )
    return ticks / os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(sid: int) -> float:
    """User and system CPU seconds so far of the processes of session *sid* that are
    still running (a worker's main process and its pool, while the pool lives)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class Landing:
    """When the keys of a phase landed in a target etcd, to within one poll interval, at the
    cost of a count-only read per poll instead of a watch (which on this 2-core machine
    took as much CPU as a pool process). `poll` notes the target's revision with the time;
    once the phase is over, `landed` reads every key back with the revision that wrote it,
    and a key had landed by the first poll that saw that revision. Poll after reading
    whatever says the phase is over: that poll then covers its last key.

    Why not the workers' own count of applied operations (their stats hash in Redis)? It
    says when a phase is over, since a task adds its count only once its batches have
    landed, but a pool process may send routine counts up to 0.25 s late (COUNT_DELAY in
    workers/tasks.py), which could stretch the end of a run by up to that much. (Measured
    once this was in place: 0-0.03 s late, in 22 runs of both scripts.)"""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.polls: list[tuple[float, int]] = []  # (time.monotonic(), target revision)
        self.revs: list[int] = []  # the revision that wrote each key read back, in order

    def poll(self) -> None:
        rev = self.etcd.revision()
        self.polls.append((time.monotonic(), rev))  # the time after: an upper bound

    def read_back(self, prefix: bytes, marker: bytes = b"") -> tuple[int, int]:
        """Read every key under *prefix*: (keys, how many do not end with *marker*). The
        read's own revision counts as a last poll, so every key read back is covered."""
        rev, kvs = self.etcd.scan(prefix)
        self.polls.append((time.monotonic(), rev))
        revs, stale = [], 0
        for kv in kvs:
            revs.append(kv.mod_revision)
            stale += not kv.value.endswith(marker)
        self.revs = sorted(revs)
        return len(revs), stale

    def landed(self, prefix: bytes, keys: int, marker: bytes = b"") -> float:
        """When the last key of the phase landed, once it is over: every one of *keys* keys
        under *prefix* must be there and end with *marker* (what said the phase was over was
        not fooled)."""
        held, stale = self.read_back(prefix, marker)
        if held != keys or stale:
            raise SystemExit(f"the target holds {held} keys, {stale} without {marker!r}")
        return self.when(keys)

    def first(self, n: int) -> tuple[float, int]:
        """The first poll that saw *n* of the keys read back landed: (its time, how many it
        saw landed)."""
        if not 1 <= n <= len(self.revs):
            raise ValueError(f"{n} keys asked for, {len(self.revs)} read back")
        rev = self.revs[n - 1]
        t, seen = next((t, r) for t, r in self.polls if r >= rev)
        return t, bisect.bisect_right(self.revs, seen)

    def when(self, n: int) -> float:
        return self.first(n)[0]

    def pace(self, a: int, b: int) -> float:
        """Keys landed per second between the polls that first saw *a* and *b* landed (the
        keys those polls saw, not b - a: a poll comes up to an interval late)."""
        (t0, c0), (t1, c1) = self.first(a), self.first(b)
        return (c1 - c0) / max(1e-9, t1 - t0)

    def keys_per_txn(self, parts: int = 10) -> list[float]:
        """The keys read back per revision that wrote them (one per transaction), in each
        of *parts* equal parts of the keys in the order they landed; a revision that spans
        two parts counts in both."""
        n = len(self.revs)
        out = []
        for i in range(parts):
            part = self.revs[i * n // parts : (i + 1) * n // parts]
            out.append(round(len(part) / max(1, len(set(part))), 1))
        return out

    def curve(self, t0: float) -> list[list[float]]:
        """(seconds since *t0*, keys landed) at each poll."""
        return [[round(t - t0, 3), bisect.bisect_right(self.revs, r)] for t, r in self.polls]
