"""Rank/world and array-task detection for each launcher, and real multi-process runs over gloo
(collectives, and the timeouts that turn a missing or hung rank into a crash).

The multi-process tests start their processes inside a fresh network namespace holding only
loopback (`unshare --net`), because torch's rendezvous store listens on all interfaces.
Run as a script, this file is the worker those tests launch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import clean_env, stop_session
from gptrain.array_task import ArrayTask, resolve_array_task
from gptrain.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    any_rank,
    barrier,
    broadcast_object,
    detect_env,
    expand_hostlist,
    expand_tasks_per_node,
    is_main,
)
from gptrain.errors import GptrainError

TORCHRUN_ENV = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "MASTER_ADDR": "node-a", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "abc",
}
# What `srun` gives task 3 of `--nodes=3 --ntasks=7` (2+2+2+1 tasks per node), on the second node.
SLURM_STEP_ENV = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1", "SLURM_NTASKS": "7", "SLURM_JOB_NODELIST": "gpu[01-02,07],cpu3",
    "SLURM_TASKS_PER_NODE": "2(x3),1",
}
# The batch script of an `sbatch --ntasks=4` job: SLURM_PROCID=0 and NTASKS=4, but no step.
SLURM_BATCH_ENV = {
    "SLURM_JOB_ID": "77", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)",
}
K8S_ENV = {"JOB_COMPLETION_INDEX": "2", "GPTRAIN_WORLD_SIZE": "4", "GPTRAIN_MASTER_ADDR": "train-0.train"}


def test_no_launcher_means_a_single_process():
    assert detect_env({}) == DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, node_rank=0,
                                     master_addr="127.0.0.1", master_port=29500, launcher="single")


def test_torchrun_variables():
    assert detect_env(TORCHRUN_ENV) == DistEnv(3, 1, 4, 2, 1, "node-a", 29511, "torchrun")
    # Without GROUP_RANK (e.g. submitit's export) ranks are laid out node by node.
    env = {k: v for k, v in TORCHRUN_ENV.items() if k != "GROUP_RANK"}
    assert detect_env(env).node_rank == 1


def test_slurm_srun_task():
    env = detect_env(SLURM_STEP_ENV)
    # master: first host of the list; port: 10000 + job id mod 20000 (same on every task)
    assert env == DistEnv(3, 1, 7, 2, 1, "gpu01", 10000 + 123456 % 20000, "slurm")
    last_node = detect_env({**SLURM_STEP_ENV, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"})
    assert (last_node.rank, last_node.local_world_size, last_node.node_rank) == (6, 1, 3)
    # The step's own variables win over the job's, and explicit MASTER_* over derived ones.
    step = detect_env({
        **SLURM_STEP_ENV, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NODELIST": "gpu[02,07]",
        "SLURM_STEP_TASKS_PER_NODE": "2,2", "SLURM_NODEID": "0", "MASTER_PORT": "40000",
    })
    assert (step.world_size, step.master_addr, step.local_world_size, step.master_port) == (4, "gpu02", 2, 40000)
    fixed = detect_env({**SLURM_STEP_ENV, "SLURM_NTASKS_PER_NODE": "3", "MASTER_ADDR": "10.0.0.5"})
    assert (fixed.local_world_size, fixed.master_addr) == (3, "10.0.0.5")


def test_slurm_batch_script_is_not_a_task():
    assert detect_env(SLURM_BATCH_ENV).launcher == "single"


def test_kubernetes_indexed_job():
    assert detect_env(K8S_ENV) == DistEnv(2, 0, 4, 1, 2, "train-0.train", 29500, "kubernetes")
    assert detect_env({**K8S_ENV, "GPTRAIN_MASTER_PORT": "23456"}).master_port == 23456
    # An Indexed Job without GPTRAIN_WORLD_SIZE is a job array (gptrain.array_task), not a training.
    assert detect_env({"JOB_COMPLETION_INDEX": "3"}).launcher == "single"
    one_pod = detect_env({"JOB_COMPLETION_INDEX": "0", "GPTRAIN_WORLD_SIZE": "1"})
    assert (one_pod.world_size, one_pod.launcher) == (1, "kubernetes")


def test_torchrun_inside_slurm_or_kubernetes_wins():
    assert detect_env({**SLURM_STEP_ENV, **TORCHRUN_ENV}).launcher == "torchrun"
    assert detect_env({**K8S_ENV, **TORCHRUN_ENV}).launcher == "torchrun"
    assert detect_env({**K8S_ENV, **SLURM_STEP_ENV}).launcher == "slurm"


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({**TORCHRUN_ENV, "RANK": "three"}, "RANK='three' is not an integer"),
        ({k: v for k, v in TORCHRUN_ENV.items() if k != "WORLD_SIZE"}, "WORLD_SIZE is missing"),
        ({**TORCHRUN_ENV, "RANK": "4"}, "RANK=4 is outside 0..WORLD_SIZE-1 (3)"),
        ({**TORCHRUN_ENV, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is outside 0..LOCAL_WORLD_SIZE-1 (1)"),
        ({**TORCHRUN_ENV, "MASTER_ADDR": ""}, "MASTER_ADDR is missing or empty"),
        ({**TORCHRUN_ENV, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({**TORCHRUN_ENV, "WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({**SLURM_STEP_ENV, "SLURM_PROCID": "7"}, "SLURM_PROCID=7 is outside 0..SLURM_NTASKS-1 (6)"),
        ({**SLURM_STEP_ENV, "SLURM_JOB_ID": "x"}, "SLURM_JOB_ID='x' is not an integer"),
        ({**SLURM_STEP_ENV, "SLURM_JOB_NODELIST": "gpu[01-"}, "SLURM_JOB_NODELIST='gpu[01-': unbalanced"),
        ({**SLURM_STEP_ENV, "SLURM_TASKS_PER_NODE": "2(3)"}, "SLURM_TASKS_PER_NODE='2(3)'"),
        ({**SLURM_STEP_ENV, "SLURM_NODEID": "4"}, "SLURM_TASKS_PER_NODE='2(x3),1' lists 4 nodes, but SLURM_NODEID is"),
        ({**SLURM_STEP_ENV, "SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside 0..SLURM_TASKS_PER_NODE-1 (1)"),
        ({**K8S_ENV, "JOB_COMPLETION_INDEX": "4"}, "JOB_COMPLETION_INDEX=4 is outside 0..GPTRAIN_WORLD_SIZE-1 (3)"),
        ({**K8S_ENV, "GPTRAIN_WORLD_SIZE": "four"}, "GPTRAIN_WORLD_SIZE='four' is not an integer"),
        ({k: v for k, v in K8S_ENV.items() if k != "GPTRAIN_MASTER_ADDR"}, "GPTRAIN_MASTER_ADDR is not set"),
        ({"GPTRAIN_WORLD_SIZE": "2"}, "JOB_COMPLETION_INDEX is not"),
    ],
)
def test_bad_values_name_the_variable(environ, variable):
    with pytest.raises(GptrainError) as err:
        detect_env(environ)
    assert variable in str(err.value)


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-2]", ["n1", "n2"]),
        ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
        ("a[1-2]b", ["a1b", "a2b"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("node[098-101]", ["node098", "node099", "node100", "node101"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("x1,y[3],z", ["x1", "y3", "z"]),
        ("localhost", ["localhost"]),
    ],
)
def test_hostlist_expansion(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["n[1-2", "n1-2]", "n[[1]]", "n[3-1]", "n[a-b]", "n[]", ",", "n[1-2]]"])
def test_bad_hostlists(hostlist):
    with pytest.raises(GptrainError, match="SLURM_JOB_NODELIST="):
        expand_hostlist(hostlist, "SLURM_JOB_NODELIST")


def test_tasks_per_node_expansion():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(GptrainError, match="SLURM_STEP_TASKS_PER_NODE='two'"):
        expand_tasks_per_node("two", "SLURM_STEP_TASKS_PER_NODE")


def test_collectives_are_no_ops_without_a_process_group(monkeypatch):
    import torch

    for name in ("RANK", "SLURM_STEP_ID", "GPTRAIN_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    tensor = torch.tensor([2.0, 4.0])
    assert all_reduce_sum(tensor) is tensor and tensor.tolist() == [2.0, 4.0]
    assert all_reduce_mean(tensor).tolist() == [2.0, 4.0]
    assert any_rank(True) is True and any_rank(False) is False
    payload = {"step": 3}
    assert broadcast_object(payload) is payload
    barrier()
    assert is_main()


# ---------------------------------------------------------------------------------------------
# Job arrays


@pytest.mark.parametrize(
    "environ, task",
    [
        ({}, ArrayTask(0, 1)),
        # sbatch --array=0-3: the whole array; its count is the split
        ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3",
          "SLURM_ARRAY_TASK_COUNT": "4"}, ArrayTask(2, 4)),
        # sbatch --array=3 and --array=1,3 with the split's size (slurm/preprocess.sbatch sets it):
        # the ids are the tasks of the original split
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_MAX": "3",
          "SLURM_ARRAY_TASK_COUNT": "1", "GPTRAIN_NUM_TASKS": "4"}, ArrayTask(3, 4)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3",
          "SLURM_ARRAY_TASK_COUNT": "2", "GPTRAIN_NUM_TASKS": "4"}, ArrayTask(1, 4)),
        ({"JOB_COMPLETION_INDEX": "2", "GPTRAIN_NUM_TASKS": "3"}, ArrayTask(2, 3)),
    ],
)
def test_array_task_is_the_array_id_of_the_submitted_split(environ, task):
    assert resolve_array_task(environ=environ) == task


@pytest.mark.parametrize(
    "environ, message",
    [
        # --array=1,3 without the split's size: refused, never re-split as "task 0 of 2"
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "3",
          "SLURM_ARRAY_TASK_COUNT": "2"}, "holds 2 of ids 1..3, a part of a larger split: set GPTRAIN_NUM_TASKS"),
        # --array=0-7 submitted for a 4-task split: every task refuses, before any work
        ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "7",
          "SLURM_ARRAY_TASK_COUNT": "8", "GPTRAIN_NUM_TASKS": "4"}, "ids go up to 7, but the split has 4 tasks"),
        ({"JOB_COMPLETION_INDEX": "3", "GPTRAIN_NUM_TASKS": "3"}, "array task index 3 is outside 0..2"),
        ({"GPTRAIN_NUM_TASKS": "many"}, "GPTRAIN_NUM_TASKS='many' is not an integer"),
    ],
)
def test_array_task_refuses_a_split_it_cannot_tell(environ, message):
    with pytest.raises(GptrainError, match=message):
        resolve_array_task(environ=environ)


def test_explicit_array_task_arguments_win():
    environ = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "1",
               "SLURM_ARRAY_TASK_COUNT": "2"}
    assert resolve_array_task(0, 3, environ) == ArrayTask(0, 3)
    assert resolve_array_task(count=5, environ=environ) == ArrayTask(1, 5)


# ---------------------------------------------------------------------------------------------
# Real multi-process runs: 2 processes, gloo, inside a loopback-only network namespace.

def _run_in_netns(script: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a bash script in a new network namespace with only loopback up."""
    proc = subprocess.Popen(
        ["unshare", "--net", "bash", "-c", "ip link set lo up\n" + script],
        env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(proc)  # the session this test started: unshare, bash, workers
        out, _ = proc.communicate()
        pytest.fail(f"distributed run did not finish in {timeout}s:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def _two_workers(out_dir: Path, envs: list[dict[str, str]], mode: str = "collectives") -> str:
    """Bash that starts this file as a worker once per env, then fails if any worker failed."""
    worker = " ".join(shlex.quote(arg) for arg in (sys.executable, __file__, str(out_dir), mode))
    lines = ["pids=()"]
    for env in envs:
        assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"env {assignments} {worker} &")
        lines.append("pids+=($!)")
    lines.append('rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc')
    return "\n".join(lines)


def _results(out_dir: Path, run: subprocess.CompletedProcess) -> list[dict]:
    assert run.returncode == 0, run.stdout
    results = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank, result in enumerate(results):
        assert result["env"]["rank"] == result["torch_rank"] == rank
        assert result["env"]["world_size"] == result["torch_world_size"] == 2
        assert result["backend"] == "gloo"
        assert result["sum"] == 1.0 + 2.0
        assert result["mean"] == 0.5
        assert result["any_last"] is True and result["any_none"] is False
        assert result["broadcast"] == {"from_rank": 0}
        assert result["is_main"] == (rank == 0)
        assert result["initialized_after_destroy"] is False
    return results


@pytest.mark.slow
def test_torchrun_standalone_two_processes(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    run = _run_in_netns(
        f"exec {shlex.quote(str(torchrun))} --standalone --nproc-per-node=2 "
        f"{shlex.quote(__file__)} {shlex.quote(str(tmp_path))}"
    )
    results = _results(tmp_path, run)
    assert [r["env"]["launcher"] for r in results] == ["torchrun", "torchrun"]
    assert [r["env"]["local_rank"] for r in results] == [0, 1]
    assert all(r["env"]["local_world_size"] == 2 for r in results)


@pytest.mark.slow
def test_slurm_style_tasks_two_processes(tmp_path):
    job_id = 4242  # no MASTER_PORT: both tasks derive port 10000 + 4242 from the job id
    common = {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2",
              "SLURM_JOB_NODELIST": "localhost", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2"}
    envs = [{**common, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)} for r in range(2)]
    results = _results(tmp_path, _run_in_netns(_two_workers(tmp_path, envs)))
    for result in results:
        assert result["env"]["launcher"] == "slurm"
        assert result["env"]["master_addr"] == "localhost"
        assert result["env"]["master_port"] == 10000 + job_id
        # Node 0 hosts rank 0: its tasks reach the store over loopback, whatever the node is called.
        assert result["exported"] == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(10000 + job_id),
                                      "WORLD_SIZE": "2", "RANK": str(result["torch_rank"])}


@pytest.mark.slow
def test_kubernetes_style_pods_two_processes(tmp_path):
    common = {"GPTRAIN_WORLD_SIZE": "2", "GPTRAIN_MASTER_ADDR": "127.0.0.1", "GPTRAIN_MASTER_PORT": "29533"}
    envs = [{**common, "JOB_COMPLETION_INDEX": str(r)} for r in range(2)]
    results = _results(tmp_path, _run_in_netns(_two_workers(tmp_path, envs)))
    for result in results:
        assert result["env"]["launcher"] == "kubernetes"
        assert result["env"]["node_rank"] == result["torch_rank"]
        assert result["env"]["master_port"] == 29533


@pytest.mark.slow
def test_a_hung_rank_or_one_that_never_joins_fails_the_others_in_time(tmp_path):
    """comm.timeout_s: rank 1 joins, then never calls the all-reduce that rank 0 waits in;
    comm.init_timeout_s: rank 1 never starts. Rank 0 raises within seconds, not gloo's 30 min."""
    env = {"GPTRAIN_WORLD_SIZE": "2", "GPTRAIN_MASTER_ADDR": "127.0.0.1", "GPTRAIN_MASTER_PORT": "29534"}
    hung = _run_in_netns(_two_workers(tmp_path, [{**env, "JOB_COMPLETION_INDEX": str(r)} for r in range(2)], "hang"))
    assert hung.returncode != 0, hung.stdout
    (timed_out,) = [json.loads(p.read_text()) for p in tmp_path.glob("rank0-timeout.json")]
    assert "timed out" in timed_out["error"].lower() or "timeout" in timed_out["error"].lower(), timed_out
    assert 1.5 <= timed_out["seconds"] < 5, timed_out

    alone = _run_in_netns(_two_workers(tmp_path, [{**env, "JOB_COMPLETION_INDEX": "0"}], "alone"))
    assert alone.returncode != 0
    joined = "rank 0 of 2 could not join the process group at 127.0.0.1:29534 within comm.init_timeout_s=2"
    assert joined in alone.stdout


TIMEOUTS = {"init_timeout_s": 2.0, "timeout_s": 2.0}  # what the timeout test's workers wait, at most


def _worker(out_dir: Path, mode: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    from gptrain.distributed import destroy_distributed, init_distributed

    if mode != "collectives":
        env = init_distributed("cpu", **TIMEOUTS)
        if env.rank == 1:
            time.sleep(5)  # alive, but never in the collective rank 0 waits in
            return
        started = time.monotonic()
        try:
            all_reduce_sum(torch.ones(1))
        except Exception as err:  # torch's DistBackendError: the collective timed out
            record = {"error": str(err), "seconds": time.monotonic() - started}
            (out_dir / "rank0-timeout.json").write_text(json.dumps(record))
            raise
        return
    env = init_distributed("cpu", init_timeout_s=60, timeout_s=60)
    total = all_reduce_sum(torch.tensor([float(env.rank + 1)]))
    mean = all_reduce_mean(torch.tensor([float(env.rank)]))
    result = {
        "env": dataclasses.asdict(env),
        "torch_rank": dist.get_rank(),
        "torch_world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "sum": total.item(),
        "mean": mean.item(),
        "any_last": any_rank(env.rank == env.world_size - 1),
        "any_none": any_rank(False),
        "broadcast": broadcast_object({"from_rank": env.rank}),
        "is_main": is_main(),
        "exported": {k: os.environ[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")},
    }
    barrier()
    destroy_distributed()
    result["initialized_after_destroy"] = dist.is_initialized()
    (out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "collectives")
