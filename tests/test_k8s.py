"""k8s/: what `kubectl kustomize` renders for each overlay is valid, wired correctly, and runs.

Offline (no API server can run here; see tests/k8s_fixtures.py for how the cluster's part
is emulated): strict schema validation of every rendered object, semantic checks of restart
policies, array sizes, rendezvous, environment, mounts, secrets and pod security, and the
cpu-smoke overlay's pods run as local processes with the environment Kubernetes would give
them: the data Jobs, then the two pretrain pods training one model with world size 2, through
a preemption (SIGTERM, checkpoint, exit 75, replacement pods that resume).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import is_running, launched_workers
from k8s_fixtures import (
    SCHEMA_VERSIONS,
    LocalPods,
    PodNetwork,
    cpu_stand_in,
    find,
    jobs_of,
    localize,
    make_pod,
    one,
    jobset_failure_action,
    pod_failure_action,
    pod_templates,
    references,
    render,
    smoke_location,
    validation_errors,
    wait_for_file,
    write_config_map,
)

from gptrain.config import flatten
from gptrain.errors import EXIT_BAD_INPUT, EXIT_PREEMPTED

OVERLAYS = ["overlays/cpu-smoke", "overlays/gpu", "overlays/gpu-jobset"]
KUSTOMIZATIONS = ["base", *OVERLAYS]
STAGES = {"download", "prepare", "finalize", "pretrain", "sweep"}
INDEXED = {"download", "prepare", "pretrain", "sweep"}
SECRET_KEYS = {("gptrain-wandb", "api-key"), ("gptrain-s3", "access-key-id"), ("gptrain-s3", "secret-access-key")}
RUN_CONFIG = "/etc/gptrain/run.yaml"
def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Job", "JobSet")]


def stage(obj: dict) -> str:
    return obj["metadata"]["labels"]["app.kubernetes.io/component"]


def containers(template: dict) -> list[dict]:
    return template["spec"]["containers"] + template["spec"].get("initContainers", [])


def env_entry(container: dict, name: str) -> dict:
    (entry,) = [e for e in container.get("env", []) if e["name"] == name]
    return entry


# ---------------------------------------------------------------------------------------------
# Schemas


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_validates_strictly(kustomization):
    objects = render(kustomization)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "Job"} <= kinds
    errors = [e for version in SCHEMA_VERSIONS for o in objects for e in validation_errors(o, version)]
    assert errors == []


def test_strict_validation_rejects_mistakes():
    """The validator is strict: a misspelt field, a wrong type, a bad JobSet field and a bad
    field inside a JobSet's Job are each reported."""
    job = one(render("overlays/cpu-smoke"), "Job", "pretrain")
    job["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    assert any("imagee" in e for e in validation_errors(job, "1.37"))
    job = one(render("overlays/cpu-smoke"), "Job", "pretrain")
    job["spec"]["completions"] = "two"
    assert validation_errors(job, "1.37")

    jobset = one(render("overlays/gpu-jobset"), "JobSet", "pretrain")
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    assert any("maxRestart" in e for e in validation_errors(jobset, "1.37"))
    jobset = one(render("overlays/gpu-jobset"), "JobSet", "pretrain")
    jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["subdomainn"] = "pretrain"
    assert any("subdomainn" in e for e in validation_errors(jobset, "1.37"))


# ---------------------------------------------------------------------------------------------
# Jobs: restart policies and failure handling


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_jobs_restart_and_fail_as_intended(kustomization):
    objects = render(kustomization)
    for workload in workloads(objects):
        for job in jobs_of(workload):
            spec, where = job["spec"], job["metadata"]["name"]
            assert spec["template"]["spec"]["restartPolicy"] == "Never", where  # podFailurePolicy needs it
            names = {c["name"] for c in containers(spec["template"])}
            for rule in spec["podFailurePolicy"]["rules"]:
                assert rule.get("onExitCodes", {}).get("containerName", "gptrain") in names, where
            if stage(workload) in INDEXED:
                assert spec["completionMode"] == "Indexed", where
            if workload["kind"] == "JobSet":
                # Any failed pod fails the Job; the JobSet then restarts every pod (a gang), only
                # once the old ones are gone, uncounted for a preemption or disruption, counted
                # for a crash, and never for bad input.
                assert spec["backoffLimit"] == 0
                policy = workload["spec"]["failurePolicy"]
                assert policy["restartStrategy"] == "BlockingRecreate" and policy["maxRestarts"] >= 1
                uncounted = "RestartJobSetAndIgnoreMaxRestarts"
                assert jobset_failure_action(workload, {"gptrain": 143}, ["DisruptionTarget"]) == uncounted
                assert jobset_failure_action(workload, {"gptrain": EXIT_PREEMPTED}) == uncounted
                assert jobset_failure_action(workload, {"gptrain": EXIT_BAD_INPUT}) == "FailJobSet"
                for crash in (1, 137):
                    assert jobset_failure_action(workload, {"gptrain": crash}) == "RestartJobSet"
                continue
            assert spec["podReplacementPolicy"] == "Failed", where  # one pod per index at a time
            # Disruptions never use up a retry; bad input is never retried.
            assert pod_failure_action(job, {"gptrain": 143}, ["DisruptionTarget"]) == "Ignore", where
            assert pod_failure_action(job, {"gptrain": EXIT_BAD_INPUT}) in ("FailIndex", "FailJob"), where
            assert pod_failure_action(job, {"gptrain": 1}) == "Count", where
            if spec.get("completionMode") == "Indexed":
                assert spec["backoffLimitPerIndex"] >= 1, where


@pytest.mark.parametrize("kustomization", ["base", "overlays/cpu-smoke", "overlays/gpu"])
def test_training_resumes_after_preemption_and_stops_on_bad_input(kustomization):
    objects = render(kustomization)
    pretrain = one(objects, "Job", "pretrain")
    # The trainer checkpoints on SIGTERM and exits with its "preempted" status: the pod is
    # replaced without counting, and the new one resumes from that checkpoint.
    assert pod_failure_action(pretrain, {"gptrain": EXIT_PREEMPTED}) == "Ignore"
    # A bad config fails every rank the same way: stop the whole Job at once.
    assert pod_failure_action(pretrain, {"gptrain": EXIT_BAD_INPUT}) == "FailJob"
    assert pretrain["spec"]["maxFailedIndexes"] == 0  # a rank out of retries stops the others
    # A sweep trial resumes the same way; a bad trial fails alone, the others finish.
    sweep = one(objects, "Job", "sweep")
    assert pod_failure_action(sweep, {"gptrain": EXIT_PREEMPTED}) == "Ignore"
    assert pod_failure_action(sweep, {"gptrain": EXIT_BAD_INPUT}) == "FailIndex"
    # Data stages: a bad index fails alone too.
    for name in ("download", "prepare"):
        assert pod_failure_action(one(objects, "Job", name), {"gptrain": EXIT_BAD_INPUT}) == "FailIndex"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_array_sizes_match_completions(kustomization):
    """Kubernetes gives a pod its index but not the Job's size: the env variables that carry
    the size must equal `completions`, and a training gang must start all at once."""
    for workload in workloads(render(kustomization)):
        for job in jobs_of(workload):
            spec, name = job["spec"], stage(workload)
            (container,) = spec["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if name in ("download", "prepare"):
                assert env["GPTRAIN_NUM_TASKS"] == str(spec["completions"]), job["metadata"]["name"]
            if name == "pretrain":
                assert spec["parallelism"] == spec["completions"]
                size = env.get("GPTRAIN_WORLD_SIZE") or env["GPTRAIN_NUM_NODES"]
                assert size == str(spec["completions"])


@pytest.mark.parametrize("kustomization", ["base", "overlays/cpu-smoke", "overlays/gpu"])
def test_sweep_job_has_one_index_per_trial(kustomization, tmp_path):
    """`gptrain sweep plan`, given the rendered spec and the pod's arguments, plans exactly
    as many trials as the sweep Job has indexes (each trial's config validated on the way)."""
    from gptrain.sweep.plan import make_plan
    from gptrain.sweep.spec import load_spec

    objects = render(kustomization)
    job = one(objects, "Job", "sweep")
    pod = make_pod(objects, job, 0)
    config_dir = write_config_map(one(objects, "ConfigMap", pod.mounts["/etc/gptrain"]["configMap"]["name"]),
                                  tmp_path / "config")
    # The spec names its base config by the mount path: point it at the local copy.
    spec_file = config_dir / "sweep.yaml"
    spec_file.write_text(spec_file.read_text().replace("/etc/gptrain/", f"{config_dir}/"))
    pod = localize(pod, {"/etc/gptrain": config_dir})
    args = pod.argv[pod.argv.index("run") + 1:]
    assert args[0] == str(spec_file) and args[1] == "--index=0"
    sweep_dir = args[2].removeprefix("--sweep-dir=")
    assert sweep_dir == pod.env["GPTRAIN_SWEEP_DIR"]
    plan = make_plan(load_spec(args[0], args[3:], sweep_dir))
    assert len(plan.trials) == job["spec"]["completions"] >= job["spec"]["parallelism"]
    assert all(t.params for t in plan.trials)


# ---------------------------------------------------------------------------------------------
# Pretrain rendezvous


@pytest.mark.parametrize("kustomization", ["base", "overlays/cpu-smoke", "overlays/gpu"])
def test_pretrain_pods_find_rank_zero_through_the_headless_service(kustomization):
    objects = render(kustomization)
    job = one(objects, "Job", "pretrain")
    template = job["spec"]["template"]
    service = one(objects, "Service", template["spec"]["subdomain"])  # subdomain = Service name
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()

    pods = [make_pod(objects, job, i) for i in range(job["spec"]["completions"])]
    svc = service["metadata"]["name"]
    assert [p.hostname for p in pods] == [f"pretrain-{i}" for i in range(len(pods))]
    for pod in pods:
        # Rank 0's DNS name under the Service, the same on every pod, and a port the Service names.
        assert pod.env["GPTRAIN_MASTER_ADDR"] == f"{pods[0].hostname}.{svc}"
        assert int(pod.env["GPTRAIN_MASTER_PORT"]) in {p["port"] for p in service["spec"]["ports"]}
        assert pod.env["JOB_COMPLETION_INDEX"] == str(pod.index)

    grace = template["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 60  # room to finish a step and write a checkpoint after SIGTERM
    if pods[0].gptrain_argv[1] == "launch":
        from gptrain.cli import build_parser

        for pod in pods:
            # Pod i is node i: the launcher's node rank comes from the index, not from DNS.
            launch = build_parser().parse_args(pod.gptrain_argv[1:])
            assert (launch.node_rank, launch.nnodes) == (pod.index, job["spec"]["completions"])
            assert (launch.master_addr, str(launch.master_port)) == (
                pod.env["GPTRAIN_MASTER_ADDR"], pod.env["GPTRAIN_MASTER_PORT"])
            assert launch.worker_command[:2] == ["--", "train"]
        assert "GPTRAIN_WORLD_SIZE" not in pods[0].env  # the launcher's RANK/WORLD_SIZE decide
    else:
        assert pods[0].gptrain_argv[:2] == ["gptrain", "train"]
        assert all(p.env["GPTRAIN_WORLD_SIZE"] == str(len(pods)) for p in pods)


def test_jobset_runs_the_gpu_pretrain_pod():
    """The JobSet variant's pod is the gpu overlay's pretrain pod, except that rank 0's
    address comes from JobSet's coordinator annotation; JobSet makes the headless Service."""
    jobset_objects = render("overlays/gpu-jobset")
    jobset = one(jobset_objects, "JobSet", "pretrain")
    gpu_job = one(render("overlays/gpu"), "Job", "pretrain")
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert not find(jobset_objects, "Job", "pretrain") and not find(jobset_objects, "Service")
    assert jobset["metadata"]["namespace"] == gpu_job["metadata"]["namespace"]
    assert replicated["template"]["spec"]["completions"] == gpu_job["spec"]["completions"]
    assert replicated["template"]["spec"]["parallelism"] == gpu_job["spec"]["completions"]

    def without_master(template: dict) -> dict:
        spec = json.loads(json.dumps(template))
        container = spec["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if e["name"] != "GPTRAIN_MASTER_ADDR"]
        return spec

    assert without_master(replicated["template"]["spec"]["template"]) == without_master(gpu_job["spec"]["template"])
    coordinator = jobset["spec"]["coordinator"]
    assert coordinator["replicatedJob"] == replicated["name"]
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    # JobSet's names: pods <jobset>-<replicatedJob>-<job index>-<pod index>, subdomain = the
    # JobSet's name; it publishes rank 0's "<hostname>.<subdomain>" as the coordinator annotation.
    name = jobset["metadata"]["name"]
    coordinator_address = f"{name}-{replicated['name']}-{coordinator['jobIndex']}-{coordinator['podIndex']}.{name}"
    (job,) = jobs_of(jobset)
    pod = make_pod(jobset_objects, job, 1, annotations={"jobset.sigs.k8s.io/coordinator": coordinator_address})
    assert pod.env["GPTRAIN_MASTER_ADDR"] == coordinator_address
    assert f"--master-addr={coordinator_address}" in pod.argv and "--node-rank=1" in pod.argv


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_commands_parse_as_gptrain_commands(kustomization):
    """Each pod's command line, as the kubelet would expand it, is gptrain under the image's init
    and is accepted by gptrain's parser, and so is the command `gptrain launch` starts in each
    worker."""
    from gptrain.cli import build_parser

    objects = render(kustomization)
    commands = {}
    for workload in workloads(objects):
        for job in jobs_of(workload):
            index = 0 if job["spec"].get("completionMode") == "Indexed" else None
            pod = make_pod(objects, job, index, annotations={"jobset.sigs.k8s.io/coordinator": "rank0.svc"})
            argv = pod.gptrain_argv  # under the image's init, tini
            if argv[1] == "launch":
                argv = ["gptrain", *build_parser().parse_args(argv[1:]).worker_command[1:]]
            args = build_parser().parse_args(argv[1:])
            subcommand = getattr(args, "data_command", None) or getattr(args, "sweep_command", None)
            commands[stage(workload)] = " ".join(filter(None, [args.command, subcommand]))
    assert commands == {"download": "data download", "prepare": "data prepare", "finalize": "data finalize",
                        "pretrain": "train", "sweep": "sweep run"}


# ---------------------------------------------------------------------------------------------
# Environment, mounts, secrets, security, resources


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_environment_and_mounts_are_wired(kustomization):
    objects = render(kustomization)
    config_maps = {c["metadata"]["name"]: c for c in find(objects, "ConfigMap")}
    claims = {c["metadata"]["name"] for c in find(objects, "PersistentVolumeClaim")}
    for workload in workloads(objects):
        for job in jobs_of(workload):
            spec = job["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in spec["volumes"]}
            for container in spec["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert set(mounts.values()) <= volumes.keys()
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in config_maps
            for volume in volumes.values():
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps
                if "persistentVolumeClaim" in volume:
                    assert volume["persistentVolumeClaim"]["claimName"] in claims

            index = 0 if job["spec"].get("completionMode") == "Indexed" else None
            pod = make_pod(objects, job, index, annotations={"jobset.sigs.k8s.io/coordinator": "rank0.example"})
            text = " ".join(pod.argv + list(pod.env.values()))
            assert not references(text), f"{job['metadata']['name']}: undefined {references(text)}"
            # Every local path the pod uses lies on a volume; the run config file is a key of
            # the ConfigMap mounted at its folder.
            for path in _paths(text):
                mount = max((m for m in pod.mounts if path == m or path.startswith(m + "/")), key=len, default=None)
                assert mount is not None, f"{job['metadata']['name']}: {path} is on no volume"
            if "train" in pod.argv:
                run_config = pod.mounts["/etc/gptrain"]["configMap"]["name"]
                assert f"--config={RUN_CONFIG}" in pod.argv
                assert Path(RUN_CONFIG).name in config_maps[run_config]["data"]
    storage = {value for c in config_maps.values() for key, value in c.get("data", {}).items()
               if key in ("GPTRAIN_RAW", "GPTRAIN_DATASET", "GPTRAIN_RUN_DIR", "GPTRAIN_SWEEP_DIR")}
    if claims:
        assert all(v.startswith("/data/") for v in storage)
    else:
        assert storage and all(v.startswith("s3://") for v in storage)


def _paths(text: str) -> set[str]:
    """Absolute local paths in `text` (not the path part of URLs such as s3://bucket/x)."""
    return set(re.findall(r"(?<![\w:/.])(/[\w./-]+)", text))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secrets_are_only_referenced(kustomization):
    objects = render(kustomization)
    assert not find(objects, "Secret")
    referenced = set()
    for workload in workloads(objects):
        for where, template in pod_templates(workload):
            for container in containers(template):
                for entry in container.get("env", []):
                    ref = entry.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add((ref["name"], ref["key"]))
                        assert ref["optional"] is True, f"{where}: {entry['name']}"
                    elif any(word in entry["name"] for word in ("KEY", "SECRET", "TOKEN", "PASSWORD")):
                        assert "value" not in entry, f"{where}: {entry['name']} has a literal value"
    assert referenced == SECRET_KEYS


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pods_meet_the_restricted_pod_security_profile(kustomization):
    objects = render(kustomization)
    (namespace,) = find(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(objects):
        assert workload["metadata"]["namespace"] == namespace["metadata"]["name"]
        for where, template in pod_templates(workload):
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["runAsUser"] > 0, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            # A volume already owned by the pods' group is not walked at every start.
            assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", where
            assert pod["automountServiceAccountToken"] is False, where
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            assert not any("hostPath" in v for v in pod["volumes"]), where
            for container in containers(template):
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False, where
                assert security["capabilities"]["drop"] == ["ALL"], where
                assert security["readOnlyRootFilesystem"] is True, where
                assert not security.get("privileged"), where
                resources = container["resources"]
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= resources[kind].keys(), f"{where}: {kind}"


def test_gpu_overlays_train_on_gpus_and_cpu_smoke_uses_none():
    for kustomization in ("overlays/gpu", "overlays/gpu-jobset"):
        objects = render(kustomization)
        for workload in workloads(objects):
            ((_, template),) = pod_templates(workload)
            spec, (container,) = template["spec"], template["spec"]["containers"]
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if stage(workload) not in ("pretrain", "sweep"):
                assert gpus is None and "nodeSelector" not in spec  # data stages stay on CPU nodes
                continue
            assert gpus == container["resources"]["requests"]["nvidia.com/gpu"] == (8 if stage(workload) == "pretrain" else 1)
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert {"train.device=cuda", "train.dtype=bf16"} <= set(container["args"])
            shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert [m["mountPath"] for m in container["volumeMounts"] if m["name"] == shm[0]["name"]] == ["/dev/shm"]
            if stage(workload) == "pretrain":
                assert env_entry(container, "GPTRAIN_PROCS_PER_NODE")["value"] == "gpu"  # one rank per GPU
                for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TORCH_FR_DUMP_TEMP_FILE"):
                    assert env_entry(container, name)["value"], name
    smoke = yaml.safe_dump(render("overlays/cpu-smoke"))
    assert "nvidia.com" not in smoke


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_belongs_to_a_stage(kustomization):
    """k8s/README.md applies one stage at a time with `kubectl apply -k DIR -l
    app.kubernetes.io/component=STAGE`: every object must carry a stage (or "shared"), and each
    Job's pods its Job's stage."""
    objects = render(kustomization)
    for obj in objects:
        assert stage(obj) in STAGES | {"shared"}, f"{obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"]["labels"]["app.kubernetes.io/name"] == "gptrain"
    for workload in workloads(objects):
        assert stage(workload) in STAGES
        for _, template in pod_templates(workload):
            assert template["metadata"]["labels"]["app.kubernetes.io/component"] == stage(workload)
    assert {stage(w) for w in workloads(objects)} == STAGES


# ---------------------------------------------------------------------------------------------
# The run configurations


@pytest.mark.parametrize(
    ("kustomization", "preset", "changed"),
    [
        ("overlays/gpu", "gpt2-124m-gutenberg", {"train.grad_accum_steps"}),
        ("overlays/cpu-smoke", "debug", {"train.max_steps", "schedule.warmup_steps", "eval.every", "checkpoint.every"}),
    ],
)
def test_run_config_loads_and_follows_its_preset(kustomization, preset, changed, tmp_path):
    """The ConfigMap's run.yaml is a valid gptrain config with the pod's command-line
    overrides, and differs from the shipped preset it copies only where it means to."""
    from gptrain.config import load_config

    objects = render(kustomization)
    job = one(objects, "Job", "pretrain")
    pod = make_pod(objects, job, 0)
    config_map = one(objects, "ConfigMap", pod.mounts["/etc/gptrain"]["configMap"]["name"])
    text = config_map["data"][Path(RUN_CONFIG).name]
    preset_text = (Path(__file__).resolve().parents[1] / "gptrain" / "presets" / f"{preset}.yaml").read_text()
    ours, theirs = flatten(yaml.safe_load(text)), flatten(yaml.safe_load(preset_text))
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} == changed

    overrides = pod.argv[pod.argv.index(f"--config={RUN_CONFIG}") + 1:]
    assert overrides[:2] == [f"data.path={pod.env['GPTRAIN_DATASET']}", f"train.run_dir={pod.env['GPTRAIN_RUN_DIR']}"]
    config_file = tmp_path / "run.yaml"
    config_file.write_text(text)
    config = load_config(str(config_file), overrides)
    assert config.data.path == pod.env["GPTRAIN_DATASET"]
    assert config.train.run_dir == pod.env["GPTRAIN_RUN_DIR"]


# ---------------------------------------------------------------------------------------------
# The cpu-smoke overlay, run as local processes


@pytest.fixture(scope="module")
def smoke_pods(tmp_path_factory, mirror_url):
    """The cpu-smoke overlay's data Jobs, run: download, then prepare, then finalize."""
    if os.geteuid() != 0:
        pytest.skip("pod networking needs root (unshare --net --mount)")
    # The one value that differs from the cluster: books come from the local test mirror.
    pods = LocalPods(render("overlays/cpu-smoke"), tmp_path_factory.mktemp("cpu-smoke"), {"GPTRAIN_MIRROR": mirror_url})
    try:
        for stage_name in ("download", "prepare", "finalize"):
            pods.run_job(stage_name)
        yield pods
    finally:
        pods.stop()


@pytest.mark.slow
def test_cpu_smoke_data_jobs_build_the_dataset(smoke_pods):
    raw = smoke_location(smoke_pods, "GPTRAIN_RAW")
    assert sorted(p.name for p in (raw / "reports").iterdir()) == ["download-0-of-2.json", "download-1-of-2.json"]
    assert 1 <= len(list((raw / "books").iterdir())) <= 8  # --limit=8 (the mirror lacks a few catalogued books)
    manifest = json.loads((smoke_location(smoke_pods, "GPTRAIN_DATASET") / "manifest.json").read_text())
    assert manifest["num_tasks"] == 2 and len(manifest["documents"]) >= 1


@pytest.fixture
def pretrain_network(smoke_pods, tmp_path):
    """Pod DNS for the pretrain pods: <hostname>.<subdomain> of each maps to 127.0.0.1."""
    job = one(smoke_pods.objects, "Job", "pretrain")
    subdomain = job["spec"]["template"]["spec"]["subdomain"]
    network = PodNetwork([f"pretrain-{i}.{subdomain}" for i in range(job["spec"]["completions"])], tmp_path)
    try:
        network.wait_ready()
        yield network
    finally:
        network.close()


@pytest.mark.slow
def test_cpu_smoke_pretrain_pods_train_with_world_size_2_and_resume_after_preemption(smoke_pods, pretrain_network):
    job = one(smoke_pods.objects, "Job", "pretrain")
    config_map = make_pod(smoke_pods.objects, job, 0).mounts["/etc/gptrain"]["configMap"]["name"]
    config = yaml.safe_load(one(smoke_pods.objects, "ConfigMap", config_map)["data"]["run.yaml"])
    max_steps, every = config["train"]["max_steps"], config["checkpoint"]["every"]
    run_dir = smoke_location(smoke_pods, "GPTRAIN_RUN_DIR")

    # Once the first checkpoint is committed, both pods get SIGTERM, as the kubelet sends it
    # when pods are evicted, preempted or deleted: they save and exit "preempted".
    started = smoke_pods.start_job("pretrain", pretrain_network)
    wait_for_file(run_dir / "checkpoints" / f"step-{every}" / "commit.json", started)
    for proc, _ in started:
        proc.send_signal(signal.SIGTERM)
    preempted = smoke_pods.wait(started)
    assert [status for status, _ in preempted] == [EXIT_PREEMPTED] * 2, preempted[0][1][-3000:]
    # The preemption checkpoint: the step the ranks had finished when SIGTERM arrived, `every`
    # itself when it landed right at that step's end (then that checkpoint is the one to resume).
    preempted_at = _newest_commit(run_dir)
    assert every <= preempted_at < max_steps
    # The Job controller replaces such pods without counting a failure; the replacements
    # (same indexes, same command) resume from the preemption checkpoint and finish.
    assert pod_failure_action(job, {"gptrain": EXIT_PREEMPTED}) == "Ignore"
    logs = smoke_pods.run_job("pretrain", pretrain_network)

    assert _newest_commit(run_dir) == max_steps
    assert f"step-{preempted_at}" in logs[0]  # rank 0 says where it resumed
    # One model trained by 2 ranks: every step consumed both ranks' batches.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("kind") == "train"][-1]
    world_size, train = 2, config["train"]
    assert last["step"] == max_steps
    assert last["tokens_seen"] == max_steps * world_size * train["micro_batch_size"] * config["model"]["context_length"]
    assert f"{world_size} rank(s) on cpu" in logs[0]


def _newest_commit(run_dir: Path) -> int:
    from gptrain.checkpoint import commit as commits

    committed = commits.committed(str(run_dir))
    return committed[-1].step if committed else 0


@pytest.mark.slow
@pytest.mark.parametrize("kustomization", ["overlays/gpu"])
def test_gpu_pretrain_pods_keep_the_exit_status_contract_and_restart_as_a_gang(
    kustomization, smoke_pods, pretrain_network, tmp_path
):
    """The gpu overlay's pretrain pods (`gptrain launch` in each, node rank = pod index), run
    here with CPU stand-ins: one CPU rank per pod instead of one per GPU, cpu/fp32, the
    cpu-smoke run config checkpointing every 3 steps, the cpu-smoke dataset. Bad input: every
    pod exits 2 and the JobSet fails. SIGTERM to both pods: 75, restart uncounted. A rank
    SIGKILLed: both pods are gone within seconds, a counted gang restart. The restarted gang
    resumes from the newest checkpoint and finishes. (The gpu-jobset overlay runs this same
    pod template: test_jobset_runs_the_gpu_pretrain_pod.) The data comes from the cpu-smoke
    data Jobs, on a volume instead of S3."""
    smoke_config = yaml.safe_load(one(smoke_pods.objects, "ConfigMap", make_pod(
        smoke_pods.objects, one(smoke_pods.objects, "Job", "pretrain"), 0).mounts["/etc/gptrain"]["configMap"]["name"]
    )["data"]["run.yaml"])
    smoke_config["checkpoint"]["every"] = 3
    objects = cpu_stand_in(render(kustomization), yaml.safe_dump(smoke_config))
    pods = LocalPods(objects, tmp_path, {"GPTRAIN_DATASET": "/data/dataset", "GPTRAIN_RUN_DIR": "/data/runs/gpu"})
    claim = tmp_path / "claims" / "gptrain-data"
    claim.mkdir(parents=True)
    (claim / "dataset").symlink_to(smoke_location(smoke_pods, "GPTRAIN_DATASET"))
    run_dir = claim / "runs" / "gpu"
    job = one(objects, "Job", "pretrain")
    jobset = one(render("overlays/gpu-jobset"), "JobSet", "pretrain")
    max_steps = smoke_config["train"]["max_steps"]

    def gang(extra_args: tuple[str, ...] = ()) -> list:
        started = copy.deepcopy(job)
        started["spec"]["template"]["spec"]["containers"][0]["args"] += list(extra_args)
        return [pods.start(started, index, pretrain_network) for index in range(job["spec"]["completions"])]

    try:
        # Bad input: every pod exits 2, and nothing restarts it.
        statuses = [status for status, _ in pods.wait(gang(("optim.lr=fast",)))]
        assert statuses == [EXIT_BAD_INPUT] * 2
        assert pod_failure_action(job, {"gptrain": EXIT_BAD_INPUT}) == "FailJob"
        assert jobset_failure_action(jobset, {"gptrain": EXIT_BAD_INPUT}) == "FailJobSet"

        # The kubelet's SIGTERM (eviction, preemption, deletion) to both pods: the launchers pass
        # it on, the ranks checkpoint and every pod exits 75: restarted, not counted.
        started = gang()
        wait_for_file(run_dir / "checkpoints" / "step-3" / "commit.json", started)
        for proc, _ in started:
            proc.send_signal(signal.SIGTERM)
        results = pods.wait(started)
        assert [status for status, _ in results] == [EXIT_PREEMPTED] * 2, results[0][1][-3000:]
        stopped = _newest_commit(run_dir)
        assert 3 <= stopped < max_steps and f"preempted by SIGTERM at step {stopped}" in results[0][1]
        assert pod_failure_action(job, {"gptrain": EXIT_PREEMPTED}) == "Ignore"
        assert jobset_failure_action(jobset, {"gptrain": EXIT_PREEMPTED}) == "RestartJobSetAndIgnoreMaxRestarts"

        # A rank SIGKILLed mid-training (pod 1's): its launcher exits with the rank's status, and
        # pod 0's rank loses its peer in the next collective: both pods are gone at once.
        started = gang()
        wait_for_file(run_dir / "checkpoints" / f"step-{(stopped // 3 + 1) * 3}" / "commit.json", started)
        (rank1,) = launched_workers(started[1][0].pid).values()
        killed_at = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        results = pods.wait(started, timeout=60)
        gone_s = time.monotonic() - killed_at
        print(f"k8s gpu pods: rank 1 SIGKILLed; both pods (launchers and ranks) gone {gone_s:.2f} s later")
        statuses = [status for status, _ in results]
        assert statuses[1] == 137 and statuses[0] not in (0, EXIT_PREEMPTED, EXIT_BAD_INPUT), results[0][1][-3000:]
        assert not is_running(rank1) and gone_s < 60
        assert all(pod_failure_action(job, {"gptrain": s}) == "Count" for s in statuses)  # every index retried
        assert jobset_failure_action(jobset, {"gptrain": 137}) == "RestartJobSet"  # counted

        # The restarted gang resumes from the newest committed checkpoint and finishes.
        newest = _newest_commit(run_dir)
        logs = [text for status, text in pods.wait(gang()) if status == 0 or pytest.fail(text[-3000:])]
        assert f"resumed from {run_dir}/checkpoints/step-{newest} at step {newest}" in logs[0]
        assert _newest_commit(run_dir) == max_steps
    finally:
        pods.stop()
