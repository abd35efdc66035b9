"""docker/Dockerfile, for real: a Docker daemon started here builds the CPU image and runs the
demo pipeline in it, as a mapped non-root user, offline, on a mounted runs folder.

No registry is reachable, so the base image is a local debootstrap of Debian and the wheels
come from a wheelhouse gathered on the host (see tests/docker_fixtures.py). The first run
fills the cache (debootstrap, wheelhouse); the image itself is built from scratch every run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, is_running
from docker_fixtures import (
    CONSTRAINTS,
    DOCKER_CLIENT,
    DockerDaemon,
    base_rootfs_tar,
    served_on_localhost,
    wheelhouse,
)

DOCKERFILE = REPO / "docker" / "Dockerfile"
DEMO_SCRIPT = REPO / "scripts" / "demo.sh"
BASE_TAG = "gptrain-test/debian-python:local"
IMAGE_TAG = "gptrain:cpu-test"
TORCH_BASE_TAG = "gptrain-test/debian-python-torch:local"
TORCH_BASE_IMAGE_TAG = "gptrain:torch-base-test"
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


def build_image(daemon: DockerDaemon, tag: str, base: str, wheel_url: str) -> str:
    """docker/Dockerfile built offline on `base`; returns BuildKit's log (plain progress)."""
    started = time.monotonic()
    build = daemon.docker(
        "build", "--progress", "plain", "--network", "host",  # RUN steps reach the wheelhouse on 127.0.0.1
        "-f", str(DOCKERFILE), "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
        "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={wheel_url}",
        str(REPO),
    )
    print(f"docker test: built {tag} in {time.monotonic() - started:.0f} s")
    return build.stderr + build.stdout


@pytest.fixture(scope="module")
def cpu_image(docker_daemon: DockerDaemon, wheel_url: str) -> str:
    """The CPU variant: a base without torch. Returns the build log."""
    return build_image(docker_daemon, IMAGE_TAG, BASE_TAG, wheel_url)


@pytest.fixture(scope="module")
def torch_base_image(docker_daemon: DockerDaemon, wheel_url: str) -> str:
    """The image built on a base whose Python already has torch, the way the default CUDA base
    (pytorch/pytorch) and NGC's images have theirs; returns the image's tag."""
    pinned_torch = re.search(r"^torch==\S+$", CONSTRAINTS.read_text(), re.MULTILINE)[0]
    # Debian's python3 has no pip of its own: run the one python3-venv ships as a wheel.
    base_dockerfile = (
        f"FROM {BASE_TAG}\n"
        "RUN set -- /usr/share/python-wheels/pip-*.whl && python3 \"$1/pip\" install --no-cache-dir "
        f"--break-system-packages --no-index --find-links {wheel_url} {pinned_torch}\n"
    )
    docker_daemon.docker("build", "--network", "host", "-t", TORCH_BASE_TAG, "-", input=base_dockerfile)
    build_image(docker_daemon, TORCH_BASE_IMAGE_TAG, TORCH_BASE_TAG, wheel_url)
    return TORCH_BASE_IMAGE_TAG


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
    # Both variants come from the one file: a CUDA PyTorch runtime by default, any base by ARG.
    base_default = dockerfile_default("BASE_IMAGE")
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base_default), base_default


@pytest.mark.slow
def test_image_runs_gptrain_as_the_cluster_manifests_user(docker_daemon, cpu_image):
    config = json.loads(docker_daemon.docker("inspect", IMAGE_TAG).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["gptrain"]
    pod_security = yaml.safe_load(POD_DEFAULTS.read_text())["spec"]["template"]["spec"]["securityContext"]
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
        " 'dists': sorted(d.metadata['Name'].lower() for d in md.distributions())}))"
    )
    found = json.loads(run_in_image(docker_daemon, "-c", probe, options=("--entrypoint", "python")))
    pinned = re.search(r"^torch==(\S+)$", CONSTRAINTS.read_text(), re.MULTILINE)[1]
    assert found["torch"] in (pinned, f"{pinned}+cpu") and found["cuda"] is None
    assert not [name for name in found["dists"] if name.startswith("nvidia")]
    assert "gptrain" in found["dists"]
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

    # scripts/demo.sh's steps and books, with a 10-step training run.
    books = re.search(r"^BOOKS=(\S+)$", DEMO_SCRIPT.read_text(), re.MULTILINE)[1]
    gptrain("data", "download", "--mirror", "/mirror", "--out", "runs/demo/books", "--ids", books)
    gptrain("data", "prepare", "--input", "runs/demo/books", "--out", "runs/demo/dataset", "--no-finalize")
    gptrain("data", "finalize", "runs/demo/dataset")
    stats = gptrain("data", "stats", "runs/demo/dataset")
    gptrain(
        "train", "--config", "debug", "data.path=runs/demo/dataset", "train.run_dir=runs/demo",
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
def test_s3_credentials_pass_as_environment_variables(docker_daemon, cpu_image, mirror_dir, s3_bucket):
    """The container writes to an S3 server with the AWS_* variables it was given (`-e NAME`)."""
    import s3fs

    aws_env = {name: os.environ[name] for name in
               ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    run_in_image(
        docker_daemon, "data", "download", "--mirror", "/mirror", "--out", f"{s3_bucket}/raw", "--limit", "4",
        options=("-v", f"{mirror_dir}:/mirror:ro", *(f"-e{name}" for name in aws_env)),
        network="host",  # the S3 server listens on the host's 127.0.0.1
        env=aws_env,
    )
    fs = s3fs.S3FileSystem()
    report = json.loads(fs.cat(f"{s3_bucket}/raw/reports/download-0-of-1.json"))
    assert report["downloaded"] and not report["failed"]
    for book in report["downloaded"]:
        assert fs.size(f"{s3_bucket}/raw/books/pg{book['book_id']}.txt") == book["bytes"]


@pytest.mark.slow
def test_a_base_with_torch_keeps_its_torch_and_torchrun_runs_gptrain(docker_daemon, torch_base_image):
    probe = "import torch, gptrain, sys; print(torch.__file__); print(sys.prefix)"
    torch_file, prefix = run_in_image(
        docker_daemon, "-c", probe, options=("--entrypoint", "python"), image=torch_base_image
    ).split()
    assert prefix == "/opt/gptrain" and not torch_file.startswith(prefix), torch_file  # the base's torch
    # `torchrun -m gptrain` (slurm/pretrain.sbatch) starts workers with torchrun's own Python,
    # so torchrun must be the virtualenv's, not the base's. (--hostname: torchrun resolves the
    # host name, which a --network none container's /etc/hosts lacks.)
    out = run_in_image(
        docker_daemon, "--nproc-per-node=1", "-m", "gptrain", "tokenizer", "encode", "Hello world",
        options=("--entrypoint", "torchrun", "--hostname", "localhost"), image=torch_base_image,
    )
    assert out.split() == ["15496", "995"]
