"""Fixtures shared across the suite: real servers on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MIRROR = (REPO / ".." / "shared" / "gutenberg-mirror").resolve()
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def is_running(pid: int) -> bool:
    """True while `pid` runs; a zombie (PID 1 of a container or namespace may reap slowly) counts as dead."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def launched_workers(pid: int) -> dict[int, int]:
    """{rank: pid} of the workers of the `gptrain launch` process `pid` or below it (an init):
    the processes in its tree that have a RANK."""
    workers = {}
    for child in map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()):
        rank = [item for item in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if item.startswith(b"RANK=")]
        if rank:
            workers[int(rank[0].split(b"=", 1)[1])] = child
        else:
            workers.update(launched_workers(child))
    return workers


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_session(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop a process started with start_new_session=True and everything left in its session:
    SIGTERM first, which torchrun passes on to its workers (they run in sessions of their own,
    out of reach of the group kill), then SIGKILL to the whole process group."""
    stop_pid(proc, timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# Variables through which a launcher (torchrun, Slurm, Kubernetes) would tell a test's child
# processes that they are ranks of some run; the tests set what they mean to.
LAUNCHER_ENV_PREFIXES = ("SLURM_", "RANK", "LOCAL_", "WORLD_SIZE", "GROUP_", "MASTER_", "TORCHELASTIC_",
                         "JOB_COMPLETION_INDEX", "GPTRAIN_")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables, for child processes that run gloo ranks
    (one thread each, over loopback), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_ENV_PREFIXES)}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1", **extra)
    return env


def run_to_completion(command: list[str], timeout: float, **popen_kwargs) -> None:
    """Run a command we start and fail unless it exits 0. Past `timeout` it is stopped with
    stop_pid: SIGTERM, which torchrun passes on to its workers (they run in sessions of their
    own, out of reach of a signal to torchrun's process group)."""
    proc = subprocess.Popen(command, **popen_kwargs)
    try:
        status = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{shlex.join(command)} did not finish within {timeout} s") from None
    finally:
        stop_pid(proc, timeout=60)  # an interrupted test leaves nothing behind either
    assert status == 0, f"{shlex.join(command)} exited with status {status}"


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    if not (MIRROR / "cache" / "epub" / "feeds" / "pg_catalog.csv").exists():
        pytest.fail(f"Gutenberg test mirror not found at {MIRROR}")
    return MIRROR


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output readable
        pass


@pytest.fixture(scope="session")
def mirror_url(mirror_dir: Path):
    """The shared Gutenberg mirror served by a real HTTP server on 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(mirror_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 protocol server (moto_server) on 127.0.0.1; AWS env vars point at it.

    Yields the endpoint URL. Tests create their own buckets (unique names).
    """
    moto = shutil.which("moto_server", path=str(VENV_BIN)) or shutil.which("moto_server")
    if moto is None:
        pytest.fail("moto_server not installed (it comes with the test extra)")
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield endpoint
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        stop_pid(proc)
        log.close()


@pytest.fixture
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the moto server; returns 's3://<bucket>'."""
    import s3fs

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"
