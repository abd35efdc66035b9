"""docker/Dockerfile, for real: a Docker daemon started here builds the CPU image and runs the
demo pipeline in it, as a mapped non-root user, offline, on a mounted runs folder; then the
exit-status contract under `docker run`/`docker stop` (tini as PID 1, `gptrain launch` with two
ranks), train.compile=true, and `docker stop` during `gptrain data prepare`.

No registry is reachable, so the base image is a local debootstrap of Debian and the wheels
come from a wheelhouse gathered on the host (see tests/docker_fixtures.py); apt reaches the
Debian mirror. The first run fills the cache (debootstrap, wheelhouse); the image itself is
built from scratch every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from checkpoint_fixtures import TINY_MODEL, prepare_dataset
from conftest import REPO, VENV_BIN, is_running, launched_workers
from download_fixtures import RsyncDaemon
from docker_fixtures import (
    DOCKER_CLIENT,
    IMAGE_LOCK,
    TORCH_CONSTRAINTS,
    DockerDaemon,
    base_rootfs_tar,
    served_on_localhost,
    wheelhouse,
)

from gptrain.train.logger import read_metrics

DOCKERFILE = REPO / "docker" / "Dockerfile"
DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
BASE_TAG = "gptrain-test/debian-python:local"
IMAGE_TAG = "gptrain:cpu-test"
# The image's user, which the Kubernetes pods also run as (k8s/base/pod-defaults.yaml).
POD_DEFAULTS = REPO / "k8s" / "base" / "pod-defaults.yaml"
# The uid:gid `docker run --user` maps the pipeline to, as a cluster user's own ids would be.
MAPPED_UID = MAPPED_GID = 4321


def dockerfile_default(arg: str) -> str:
    """The default value of `ARG <arg>=...` in the Dockerfile."""
    match = re.search(rf"^ARG {arg}=(.*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"{DOCKERFILE} declares no default for ARG {arg}"
    return match[1]


@pytest.fixture(scope="module")
def docker_daemon(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the Docker tests start dockerd, which needs root")
    missing = [tool for tool in ("dockerd", "debootstrap") if shutil.which(tool) is None]
    if not Path(DOCKER_CLIENT).exists():
        missing.append(DOCKER_CLIENT)
    if missing:
        pytest.fail(f"missing {missing}: run scripts/system-deps.sh (apt docker.io debootstrap)")
    daemon = DockerDaemon(tmp_path_factory.mktemp("dockerd"))
    daemon.start()
    pids = daemon.pids()
    yield daemon
    daemon.stop()
    still_running = [pid for pid in pids if is_running(pid)]
    assert not still_running, f"dockerd/containerd still running after stop: {still_running}"


@pytest.fixture(scope="module")
def wheel_url(docker_daemon: DockerDaemon):
    """Imports the local base image and serves the wheelhouse; yields the wheelhouse's URL."""
    started = time.monotonic()
    extras = [extra for extra in dockerfile_default("GPTRAIN_EXTRAS").split(",") if extra]
    with ThreadPoolExecutor(max_workers=2) as pool:  # both mostly wait on the network when cold
        rootfs_future, wheels_future = pool.submit(base_rootfs_tar), pool.submit(wheelhouse, extras)
        rootfs, wheels = rootfs_future.result(), wheels_future.result()
    with open(rootfs, "rb") as tar:
        docker_daemon.docker("import", "-", BASE_TAG, stdin=tar)
    print(f"docker test: base image and wheelhouse ready in {time.monotonic() - started:.0f} s")
    with served_on_localhost(wheels) as url:
        yield url


@pytest.fixture(scope="module")
def cpu_image(docker_daemon: DockerDaemon, wheel_url: str) -> str:
    """docker/Dockerfile's CPU variant built offline on the local base; returns BuildKit's log."""
    started = time.monotonic()
    build = docker_daemon.docker(
        "build", "--progress", "plain", "--network", "host",  # RUN steps reach the wheelhouse on 127.0.0.1
        "-f", str(DOCKERFILE), "-t", IMAGE_TAG, "--build-arg", f"BASE_IMAGE={BASE_TAG}",
        "--build-arg", "TORCH_VARIANT=cpu", "--build-arg", "PIP_NO_INDEX=1",
        "--build-arg", f"PIP_FIND_LINKS={wheel_url}",
        str(REPO),
    )
    print(f"docker test: built {IMAGE_TAG} in {time.monotonic() - started:.0f} s")
    return build.stderr + build.stdout


def run_in_image(
    daemon: DockerDaemon, *args: str, options: tuple[str, ...] = (), network: str = "none",
    env: dict[str, str] | None = None, image: str = IMAGE_TAG,
) -> str:
    """`docker run` the image, offline unless told; `env`: the docker client's extra environment
    (what `-e NAME` options pass on). Returns stdout."""
    return daemon.docker("run", "--rm", "--network", network, *options, image, *args, env=env).stdout


def test_dockerfile_is_hadolint_clean():
    result = subprocess.run([str(VENV_BIN / "hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Both variants come from the one file and the one base, pinned by digest; CUDA by default.
    base_default = dockerfile_default("BASE_IMAGE")
    assert re.fullmatch(r"python:[\w.-]+@sha256:[0-9a-f]{64}", base_default), base_default
    assert dockerfile_default("TORCH_VARIANT") == "cuda"


@pytest.mark.slow
def test_image_runs_gptrain_as_the_cluster_manifests_user(docker_daemon, cpu_image):
    config = json.loads(docker_daemon.docker("inspect", IMAGE_TAG).stdout)[0]["Config"]
    pod = yaml.safe_load(POD_DEFAULTS.read_text())["spec"]["template"]["spec"]
    # tini as PID 1 before gptrain, and the pods spell out the same command.
    assert config["Entrypoint"] == ["tini", "-g", "--", "gptrain"] == pod["containers"][0]["command"]
    pod_security = pod["securityContext"]
    assert config["User"] == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    assert run_in_image(docker_daemon, "-u", options=("--entrypoint", "id")).strip() == str(pod_security["runAsUser"])
    assert "data" in run_in_image(docker_daemon, "--help") and "train" in run_in_image(docker_daemon, "--help")
    # .dockerignore keeps .venv, runs/ and .git out of the build context: it is a few hundred kB.
    context_sizes = re.findall(r"transferring context: ([\d.]+)([kMG]?B)", cpu_image)
    assert context_sizes, "BuildKit's log shows no context transfer"
    size, unit = context_sizes[-1]
    assert float(size) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit] < 5e6, context_sizes


@pytest.mark.slow
def test_cpu_image_has_pinned_cpu_torch_and_tokenizes_offline(docker_daemon, cpu_image):
    probe = (
        "import json, importlib.metadata as md, torch;"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        " 'dists': sorted(d.metadata['Name'].lower() for d in md.distributions()),"
        " 'versions': {d.metadata['Name'].lower(): d.version for d in md.distributions()}}))"
    )
    found = json.loads(run_in_image(docker_daemon, "-c", probe, options=("--entrypoint", "python")))
    pinned = re.search(r"^torch==(\S+)$", TORCH_CONSTRAINTS.read_text(), re.MULTILINE)[1]
    assert found["torch"] in (pinned, f"{pinned}+cpu") and found["cuda"] is None
    assert not [name for name in found["dists"] if name.startswith("nvidia")]
    assert "gptrain" in found["dists"]
    # Every other package at the version constraints/image.txt locks.
    locked = dict(line.split("==") for line in IMAGE_LOCK.read_text().splitlines() if "==" in line)
    installed = {name.replace("_", "-"): version for name, version in found["versions"].items()}
    assert {name: installed.get(name) for name in locked if name in installed} == {
        name: version for name, version in locked.items() if name in installed}
    assert set(installed) - set(locked) - {"gptrain", "torch", "pip"} == set()
    # The GPT-2 BPE files were seeded into TIKTOKEN_CACHE_DIR at build time: no network, and a
    # read-only root filesystem (as in the Kubernetes pods) is enough.
    ids = run_in_image(docker_daemon, "tokenizer", "encode", "Hello world", options=("--read-only",))
    assert ids.split() == ["15496", "995"]


@pytest.mark.slow
def test_demo_pipeline_runs_as_a_mapped_user_on_a_mounted_runs_folder(docker_daemon, cpu_image, mirror_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, MAPPED_UID, MAPPED_GID)
    options = (
        "--user", f"{MAPPED_UID}:{MAPPED_GID}",
        "--read-only", "--tmpfs", "/tmp",  # like the Kubernetes pods: writes go to mounts only
        "-v", f"{mirror_dir}:/mirror:ro",
        "-v", f"{runs}:/workspace/runs",
    )

    def gptrain(*args: str, env: dict[str, str] | None = None) -> str:
        # `-e NAME` copies NAME's value from the client's environment, so secrets such as a
        # real WANDB_API_KEY never appear on a command line.
        return run_in_image(docker_daemon, *args, options=(*options, *(f"-e{name}" for name in env or {})), env=env)

    # scripts/demo.sh's steps, books and preset, with a 10-step training run.
    books, split_seed = (re.search(rf"^{name}=(\S+)$", DEMO_SCRIPT.read_text(), re.MULTILINE)[1]
                         for name in ("BOOKS", "SPLIT_SEED"))
    gptrain("data", "download", "--mirror", "/mirror", "--out", "runs/demo/books", "--ids", books)
    gptrain("data", "prepare", "--input", "runs/demo/books", "--out", "runs/demo/dataset", "--split-seed", split_seed,
            "--no-finalize")
    gptrain("data", "finalize", "runs/demo/dataset")
    stats = gptrain("data", "stats", "runs/demo/dataset")
    gptrain(
        "train", "--config", "demo", "data.path=runs/demo/dataset", "train.run_dir=runs/demo",
        "train.max_steps=10", "schedule.warmup_steps=2", "eval.every=5", "eval.max_windows=4",
        "eval.sample_max_new_tokens=4", "logging.wandb=true",
        env={"WANDB_MODE": "offline", "WANDB_API_KEY": "test-key-never-sent"},
    )

    manifest = json.loads((runs / "demo" / "dataset" / "manifest.json").read_text())
    assert re.search(rf"^books +{len(books.split(','))} kept, 0 dropped", stats, re.MULTILINE), stats
    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert shards and all((runs / "demo" / "dataset" / s["path"]).stat().st_size == s["bytes"] for s in shards)
    run_dir = runs / "demo"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["path"] == "runs/demo/dataset" and config["train"]["max_steps"] == 10
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 10
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 5, 10] and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert (run_dir / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    wandb_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_runs) == 1 and b"val_loss" in wandb_runs[0].read_bytes()
    # Every file the container wrote belongs to the mapped user, not root or the image's user.
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in runs.rglob("*")}
    assert owners == {(MAPPED_UID, MAPPED_GID)}, owners


@pytest.mark.slow
def test_rsync_download_to_s3_with_credentials_as_environment_variables(
    docker_daemon, cpu_image, mirror_dir, s3_bucket, tmp_path
):
    """The image's rsync client downloads from a module laid out like Project Gutenberg's
    gutenberg-epub (`<id>/pg<id>.txt`, `feeds/pg_catalog.csv`: the launchers' default mirror),
    as task 0 of 2, and the container writes to an S3 server with the AWS_* variables it was
    given (`-e NAME`)."""
    import s3fs

    aws_env = {name: os.environ[name] for name in
               ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    with RsyncDaemon(tmp_path, {"gutenberg-epub": mirror_dir / "cache" / "epub"}) as rsyncd:
        run_in_image(
            docker_daemon, "data", "download", "--mirror", rsyncd.url("gutenberg-epub"), "--out", f"{s3_bucket}/raw",
            "--ids", "11,35,43,46,74,98", "--task-index", "0", "--num-tasks", "2",
            options=tuple(f"-e{name}" for name in aws_env),
            network="host",  # the S3 server and the rsync daemon listen on the host's 127.0.0.1
            env=aws_env,
        )
        sent = rsyncd.sent()
    fs = s3fs.S3FileSystem()
    report = json.loads(fs.cat(f"{s3_bucket}/raw/reports/download-0-of-2.json"))
    assert report["downloaded"] and not report["failed"]
    books = [book["book_id"] for book in report["downloaded"]]
    assert books == [46, 74, 98], books  # task 0 of 2: the even ids
    # The catalog and each of the task's books crossed the wire once, in the module's layout.
    assert sorted(sent) == sorted(["feeds/pg_catalog.csv", *(f"{book_id}/pg{book_id}.txt" for book_id in books)])
    for book in report["downloaded"]:
        assert fs.size(f"{s3_bucket}/raw/books/pg{book['book_id']}.txt") == book["bytes"]




def _container_status(daemon: DockerDaemon, name: str, timeout: float = 300) -> int:
    """`docker wait NAME`: the container's exit status, once it has exited."""
    return int(daemon.docker("wait", name, timeout=timeout).stdout.strip())


@pytest.mark.slow
def test_exit_statuses_signals_and_compile_under_docker_run(docker_daemon, cpu_image, tmp_path):
    """The image keeps gptrain's exit-status contract: bad input exits 2 (two ranks under
    `gptrain launch`); `docker stop` (SIGTERM to tini, PID 1) reaches gptrain, which saves a
    checkpoint, and the container exits 75, here while training with train.compile=true
    (Inductor compiles with the image's g++); a rank SIGKILLed: the launcher stops the other
    and the container exits at once with 137. (Resuming after each: tests/test_launch.py.)"""
    data = prepare_dataset(tmp_path / "data")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, MAPPED_UID, MAPPED_GID)
    mounts = ("--user", f"{MAPPED_UID}:{MAPPED_GID}", "-v", f"{data}:/data:ro", "-v", f"{runs}:/workspace/runs")
    train = [
        "train", "--config", "debug", "data.path=/data", *(f"model.{k}={v}" for k, v in TINY_MODEL.items()),
        "train.micro_batch_size=2", "train.log_every=1", "schedule.warmup_steps=2", "eval.every=0",
        "eval.max_windows=2", "eval.sample_prompt=", "logging.plot=false", "train.max_steps=200",
    ]

    def docker_run(name: str, *args: str) -> None:
        docker_daemon.docker("run", "-d", "--name", name, "--network", "none", *mounts, IMAGE_TAG, *args)

    def wait_for_step(name: str, run_dir: Path, step: int) -> None:
        deadline = time.monotonic() + 300
        while not any(r["step"] >= step for r in read_metrics(str(run_dir)) if r["kind"] == "train"):
            running = json.loads(docker_daemon.docker("inspect", name).stdout)[0]["State"]["Running"]
            assert running and time.monotonic() < deadline, docker_daemon.docker("logs", name).stderr[-3000:]
            time.sleep(0.1)

    launch = ["launch", "--nproc-per-node", "2", "--"]
    docker_run("bad-config", *launch, *train, "train.run_dir=runs/bad", "optim.lr=fast")
    assert _container_status(docker_daemon, "bad-config") == 2
    assert "optim.lr='fast': expected a number" in docker_daemon.docker("logs", "bad-config").stdout

    docker_run("compiled", *train, "train.run_dir=runs/compiled", "train.compile=true")
    wait_for_step("compiled", runs / "compiled", 10)  # compiled, and past warmup: the loss has fallen
    docker_daemon.docker("stop", "--time", "120", "compiled")  # SIGTERM; SIGKILL only after 120 s
    assert _container_status(docker_daemon, "compiled") == 75
    logs = docker_daemon.docker("logs", "compiled").stderr
    (stopped,) = re.findall(r"preempted by SIGTERM at step (\d+): checkpoint committed", logs)
    assert (runs / "compiled" / "checkpoints" / f"step-{stopped}" / "commit.json").exists()
    losses = [r["loss"] for r in read_metrics(str(runs / "compiled")) if r["kind"] == "train"]
    assert losses[-1] < losses[0]

    docker_run("crashed", *launch, *train, "train.run_dir=runs/crashed")
    wait_for_step("crashed", runs / "crashed", 2)
    init_pid = json.loads(docker_daemon.docker("inspect", "crashed").stdout)[0]["State"]["Pid"]
    killed_at = time.monotonic()
    os.kill(launched_workers(init_pid)[1], signal.SIGKILL)
    assert _container_status(docker_daemon, "crashed") == 137
    print(f"docker test: rank 1 SIGKILLed; the container exited {time.monotonic() - killed_at:.2f} s later")
    assert "rank 1 was killed by SIGKILL (status 137): killing the other workers" in (
        docker_daemon.docker("logs", "crashed").stderr)


@pytest.mark.slow
def test_docker_stop_during_prepare_exits_at_once_and_a_rerun_writes_identical_shards(
    docker_daemon, cpu_image, mirror_dir, tmp_path
):
    """tini passes `docker stop`'s SIGTERM to gptrain and its tokenizer processes, which stop
    at once (prepare writes atomically: nothing to save); the rerun produces the shards an
    uninterrupted prepare on the host produces."""
    runs = tmp_path / "runs"
    runs.mkdir()
    os.chown(runs, MAPPED_UID, MAPPED_GID)
    mounts = ("--user", f"{MAPPED_UID}:{MAPPED_GID}", "-v", f"{mirror_dir}:/mirror:ro", "-v", f"{runs}:/workspace/runs")
    run_in_image(docker_daemon, "data", "download", "--mirror", "/mirror", "--out", "runs/books", options=mounts)
    prepare = ["data", "prepare", "--input", "runs/books", "--out", "runs/dataset", "--workers", "2",
               "--shard-tokens", "20000"]
    docker_daemon.docker("run", "-d", "--name", "prepare", "--network", "none", *mounts, IMAGE_TAG, *prepare)
    deadline = time.monotonic() + 120
    while not list((runs / "dataset" / "shards").glob("*")):  # the first shard: it is half way
        assert time.monotonic() < deadline and json.loads(
            docker_daemon.docker("inspect", "prepare").stdout)[0]["State"]["Running"], "prepare ended too early"
        time.sleep(0.05)
    started = time.monotonic()
    docker_daemon.docker("stop", "--time", "30", "prepare")
    stop_s = time.monotonic() - started
    print(f"docker test: docker stop during data prepare returned after {stop_s:.2f} s")
    assert _container_status(docker_daemon, "prepare") == 143 and stop_s < 5  # SIGTERM ended it, not SIGKILL
    assert not (runs / "dataset" / "manifest.json").exists()

    run_in_image(docker_daemon, *prepare, options=mounts)
    reference = tmp_path / "reference"
    subprocess.run([str(VENV_BIN / "gptrain"), *prepare[:3], str(runs / "books"), "--out", str(reference),
                    *prepare[6:]], check=True, capture_output=True)
    shards = {p.name: p.read_bytes() for p in (runs / "dataset" / "shards").iterdir()}
    assert shards == {p.name: p.read_bytes() for p in (reference / "shards").iterdir()}
    manifest = json.loads((runs / "dataset" / "manifest.json").read_text())
    assert manifest["fingerprint"] == json.loads((reference / "manifest.json").read_text())["fingerprint"]
