"""A real Slurm cluster for the tests: slurmctld and two slurmd (emulated nodes n1 and n2, two
CPUs each) in a network namespace that has only loopback, brought up by tests/infra/slurm-up.sh
and stopped, by PID, by tests/infra/slurm-down.sh.

Test modules import the `slurm_cluster` fixture. pytest keeps a separate session fixture for
each module that imports one, so the cluster itself is shared through a reference count: the
first user starts it, the last one stops it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "tests" / "infra"
VENV = Path(sys.executable).parent.parent  # the jobs run gptrain from the tests' own virtualenv

# Job states after which a job does nothing more (a requeued job passes through REQUEUED and
# PENDING, so those are not among them).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
_FIELD = re.compile(r"(\w+)=(.*?)(?= \w+=|$)")


@dataclass
class SlurmCluster:
    state_dir: Path

    @property
    def bin_dir(self) -> Path:
        """sbatch, squeue, scancel, ...: wrappers that talk to this cluster."""
        return self.state_dir / "bin"

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment, pointed at the cluster. sbatch passes it on to the jobs."""
        env = dict(os.environ)
        env.update(
            PATH=f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            SLURM_CONF=str(self.state_dir / "slurm.conf"),
            GPTRAIN_VENV=str(VENV),
            GPTRAIN_SLURM_DIR=str(REPO / "slurm"),
            GLOO_SOCKET_IFNAME="lo",  # the namespace has no other interface
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def run(self, *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> str:
        """A command with the cluster's client commands on PATH; its stdout. Fails on error."""
        done = subprocess.run(
            argv, cwd=cwd, env=env or self.env(), capture_output=True, text=True, timeout=timeout
        )
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def sbatch(self, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submit; the job id."""
        return self.run("sbatch", "--parsable", *argv, cwd=cwd, env=env).strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job`: one dict per job (several for an array). Slurm keeps finished
        jobs there for MinJobAge (300 s)."""
        out = self.run("scontrol", "--oneliner", "show", "job", job_id)
        lines = [line for line in out.splitlines() if line.strip()]
        return [{key: value.strip() for key, value in _FIELD.findall(line)} for line in lines]

    def wait(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Wait until the job (every task of an array) is in a final state; their records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.jobs(job_id)
            if all(r["JobState"] in FINAL_STATES for r in records):
                return records
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} not done after {timeout:.0f} s: {records}\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted((self.state_dir / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def _up(state_dir: Path) -> SlurmCluster:
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests run slurmctld/slurmd/munged and need root (as in CI)")
    env = dict(os.environ, SLURM_NS=f"gptrain-slurm-{os.getpid()}", NODES="n1 n2", CPUS_PER_NODE="2")
    up = subprocess.run(
        ["bash", str(INFRA / "slurm-up.sh"), str(state_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    if up.returncode != 0:
        _down(state_dir)
        pytest.fail(f"slurm-up.sh failed ({up.returncode}):\n{up.stdout}{up.stderr}")
    return SlurmCluster(state_dir)


def _down(state_dir: Path) -> None:
    subprocess.run(["bash", str(INFRA / "slurm-down.sh"), str(state_dir)], check=True, timeout=120)


_cluster: SlurmCluster | None = None
_users = 0


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    global _cluster, _users
    if _cluster is None:
        _cluster = _up(tmp_path_factory.mktemp("slurm"))
    _users += 1
    try:
        yield _cluster
    finally:
        _users -= 1
        if _users == 0:
            cluster, _cluster = _cluster, None
            _down(cluster.state_dir)
