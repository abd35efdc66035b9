"""A real Docker daemon for tests, and what building gptrain's image needs without a registry.

* `DockerDaemon`: Debian's dockerd on a private unix socket, with its data and exec roots in a
  test folder, no bridge and no iptables rules; it never touches a system Docker. Stopped by PID.
* `base_rootfs_tar`: no registry is reachable, so the base image is a Debian minbase made by
  debootstrap, plus python3, venv and Python's headers (what python:3.11-slim provides), from
  the Debian mirror apt is configured with, which the image's apt step then uses too. Imported
  with `docker import`.
* `wheelhouse`: pip inside the image cannot reach PyPI, so every wheel the image installs (the
  project's dependencies, CPU torch, the build backend) is gathered on the host and served to
  the build over HTTP on 127.0.0.1.

The debootstrap tarball and the wheelhouse are cached across runs in GPTRAIN_TEST_CACHE
(default /var/tmp/gptrain-test-cache), keyed by what they are made from; a cold cache builds them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

from conftest import REPO, free_port, is_running, stop_pid, wait_for_port

CACHE_DIR = Path(os.environ.get("GPTRAIN_TEST_CACHE", "/var/tmp/gptrain-test-cache"))
TORCH_CONSTRAINTS = REPO / "constraints" / "torch.txt"
IMAGE_LOCK = REPO / "constraints" / "image.txt"
# Debian docker.io's client: it drives the daemon's built-in BuildKit, where a newer client
# without the buildx plugin refuses to.
DOCKER_CLIENT = "/usr/bin/docker"
# What the base image holds besides minbase: what python:3.11-slim has, a Python that can make
# virtualenvs, with its C headers (Inductor builds its kernels as Python extensions).
BASE_PACKAGES = ("python3", "python3-venv", "python3-dev")
# Upper bound of dockerd's tmpfs data root (memory); the two images built by tests/test_docker.py
# and their build caches take about 3 GB.
DATA_ROOT_TMPFS_SIZE = "8g"


# --------------------------------------------------------------------------------------------
# The daemon


def _terminate(pid: int, timeout: float) -> None:
    """SIGTERM `pid`, then SIGKILL once `timeout` seconds pass."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if is_running(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class DockerDaemon:
    """dockerd listening only on `root`/docker.sock; `docker(...)` runs the client against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "docker.sock"
        self.pidfile = root / "dockerd.pid"
        self.log = root / "dockerd.log"
        self.exec_root = root / "exec"
        self._proc: subprocess.Popen | None = None
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_BUILDKIT": "1",
            "DOCKER_CONFIG": str(root / "client-config"),  # no user config (credential helpers)
        }
        self.env.pop("DOCKER_CONTEXT", None)

    def start(self, timeout: float = 60.0) -> None:
        dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
        data_root = self.root / "data"
        data_root.mkdir()
        dockerd_command = [
            dockerd, "--host", f"unix://{self.socket}",
            "--data-root", str(data_root), "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
            # No bridge and no iptables: nothing on the host's network changes. Builds and
            # containers use --network host or none.
            "--bridge=none", "--iptables=false", "--ip6tables=false",
            "--storage-driver=overlay2",
        ]
        # The data root is a tmpfs mounted in dockerd's own mount namespace: deleting the GBs of
        # layers of a torch image from disk took over two minutes here, while this tmpfs goes
        # away with dockerd, even if the test is killed. `unshare` execs, so the PID is dockerd's.
        mount_then_exec = 'mount -t tmpfs -o size="$1" gptrain-dockerd-data "$2" && shift 2 && exec "$@"'
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount_then_exec, "sh",
                 DATA_ROOT_TMPFS_SIZE, str(data_root), *dockerd_command],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.docker("version", check=False).returncode != 0:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd did not come up; log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    def pids(self) -> list[int]:
        """dockerd's PID and that of the containerd it started."""
        pidfiles = [self.pidfile, self.exec_root / "containerd" / "containerd.pid"]
        return [int(f.read_text()) for f in pidfiles if f.exists()]

    def docker(
        self, *args: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """Run the docker client (with `env` added to its environment); with `check`, a failure
        raises with the command's output."""
        result = subprocess.run(
            [DOCKER_CLIENT, *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
            timeout=timeout, **kwargs,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Remove every container, then SIGTERM dockerd (its pidfile) and its containerd."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            ids = self.docker("ps", "-aq", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False)
        # dockerd first (it stops the containerd it started), then any process left.
        for pid in self.pids() or [self._proc.pid]:
            _terminate(pid, timeout=30)
        stop_pid(self._proc)  # reaps our child
        self._proc = None


# --------------------------------------------------------------------------------------------
# Cached inputs of the build


def _cached(kind: str, key: str, make: Callable[[Path], None], suffix: str = "") -> Path:
    """CACHE_DIR/<kind>-<key><suffix>, made by `make(tmp_path)` then renamed into place when missing.

    A lock file serialises concurrent test runs; a half-made entry never takes the final name.
    Making a new entry deletes the older ones of the same kind (made from an older pyproject).
    """
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"{kind}-{key}{suffix}"
    with open(CACHE_DIR / f".{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            partial = CACHE_DIR / f".{target.name}.partial"
            if partial.is_dir():
                shutil.rmtree(partial)
            partial.unlink(missing_ok=True)
            make(partial)
            for old in CACHE_DIR.glob(f"{kind}-*"):
                if old.is_dir():
                    shutil.rmtree(old)
                else:
                    old.unlink()
            partial.rename(target)
    return target


def _key(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("/etc/os-release has no VERSION_CODENAME: not a Debian-like host")


def apt_debian_mirror(codename: str) -> str:
    """The URI of the apt source that serves `codename`'s main component (one-line or deb822)."""
    sources: list[tuple[list[str], list[str], list[str]]] = []  # (uris, suites, components)
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line and not line.startswith(("#", " ", "\t")) and ":" in line:
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                    sources.append((fields.get("uris", "").split(), fields.get("suites", "").split(),
                                    fields.get("components", "").split()))
        elif path.name == "sources.list" or path.suffix == ".list":
            if not path.is_file():
                continue
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()  # drop [options]
                if len(words) >= 3 and words[0] == "deb":
                    sources.append(([words[1]], [words[2]], words[3:]))
    for uris, suites, components in sources:
        if codename in suites and "main" in components and uris:
            return uris[0]
    raise RuntimeError(f"no apt source serves Debian {codename!r} main; debootstrap needs a mirror")


def base_rootfs_tar() -> Path:
    """A tarball of a Debian minbase root filesystem (the host's release) with python3 and venv."""
    codename = host_codename()
    mirror = apt_debian_mirror(codename)

    def make(partial: Path) -> None:
        rootfs = partial.with_name(partial.name + ".rootfs")
        shutil.rmtree(rootfs, ignore_errors=True)
        log = partial.with_name(partial.name + ".log")
        with open(log, "wb") as out:
            status = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", codename,
                 str(rootfs), mirror], stdout=out, stderr=subprocess.STDOUT,
            ).returncode
        if status != 0:
            raise RuntimeError(f"debootstrap {codename} {mirror} exited {status}; see {log}")
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
        shutil.rmtree(rootfs)
        log.unlink()

    return _cached(f"rootfs-{codename}", _key(codename, mirror, *BASE_PACKAGES), make, suffix=".tar")


def wheelhouse(extras: list[str]) -> Path:
    """Wheels of the build backend and every runtime dependency (with `extras`), at the versions
    of constraints/image.txt, CPU torch pinned by constraints/torch.txt.

    Built with the host's pip and its configuration (on this machine torch's CPU wheel comes
    from the configured find-links); a CUDA torch would pull nvidia-* wheels and is refused.
    """
    pyproject_bytes = (REPO / "pyproject.toml").read_bytes()
    pyproject = tomllib.loads(pyproject_bytes.decode())
    optional = pyproject["project"]["optional-dependencies"]
    requirements = [
        *pyproject["build-system"]["requires"], *pyproject["project"]["dependencies"],
        *(requirement for extra in extras for requirement in optional[extra]),
    ]
    py_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"

    def make(partial: Path) -> None:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(partial),
             "-c", str(TORCH_CONSTRAINTS), "-c", str(IMAGE_LOCK), *requirements],
            capture_output=True, text=True,
        )
        if pip.returncode != 0:
            raise RuntimeError(f"pip wheel exited {pip.returncode}:\n{pip.stdout[-3000:]}\n{pip.stderr[-3000:]}")
        cuda = sorted(p.name for p in partial.glob("nvidia_*.whl"))
        if cuda:
            shutil.rmtree(partial)
            raise RuntimeError(
                f"pip resolved a CUDA torch (it pulled {cuda[:3]}...); make pip find the CPU wheel "
                "(PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu)"
            )

    key = _key(pyproject_bytes, TORCH_CONSTRAINTS.read_bytes(), IMAGE_LOCK.read_bytes(), *extras)
    return _cached(f"wheelhouse-{py_tag}", key, make)


@contextlib.contextmanager
def served_on_localhost(folder: Path) -> Iterator[str]:
    """`folder` served by a real HTTP server on 127.0.0.1; yields its URL (a pip find-links page)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(folder), str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_pid(proc)
