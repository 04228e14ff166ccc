"""KubeRay manifests for a job spec: a RayJob (cluster created for the job, deleted after it) or a
standalone RayCluster that `ftcluster submit` can target.

The job spec (and small data files) travel in a ConfigMap mounted into every pod; big data and
outputs belong on a shared volume (`--pvc`) or in run storage (`output.dir: s3://...`): a pod's own
disk goes with the cluster, so a job that would write there is refused unless asked for. ftcluster
and its dependencies come from the image (see k8s/Dockerfile), or from a remote `working_dir` URI;
a local path would not exist in a pod. The user's own modules the spec names (a reward's
my_rewards.py, a package folder) travel in the ConfigMap too: its keys are flat, so the volume's
`items` rebuild their folders in the mount, which PYTHONPATH names in every container.

Resources add up by construction: the head runs the driver, which reserves no CPU, and schedules no
training (`num-gpus` 0; `num-cpus` 0, or for a sweep whose trials start worker groups the CPUs their
trial drivers reserve, `TRIAL_DRIVER_CPUS` each, with the `TRIAL_DRIVER_RESOURCE` that sends them there,
fewer CPUs than any training worker needs); each worker pod
holds one Ray Train worker per GPU, and their CPUs split the pod's.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftcluster.cluster.user_code import find_user_code
from ftcluster.config.spec import JobSpec, WandbSpec, dump_spec
from ftcluster.core.errors import FtError
from ftcluster.core.locations import is_remote
from ftcluster.core.storage import is_uri
from ftcluster.sweep.trial import TRIAL_DRIVER_CPUS, TRIAL_DRIVER_RESOURCE

# Values the CRD leaves as free strings but KubeRay's operator accepts only from this list.
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
JOB_MOUNT = "/etc/ftcluster/job"
SHARED_MOUNT = "/mnt/shared"
CONFIGMAP_LIMIT = 900 * 1024  # Kubernetes caps a ConfigMap at 1 MiB; leave room for metadata
GPU_RESOURCE = "nvidia.com/gpu"
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")  # Kubernetes memory quantities
STOCK_RAY_IMAGE = "rayproject/ray"


@dataclass
class K8sOptions:
    image: str
    workers: int
    gpus_per_worker: int = 0
    cpus_per_worker: int = 8
    memory_per_worker: str = "64Gi"
    head_cpus: int = 4
    head_memory: str = "16Gi"
    shm_size: str = "16Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)
    pvc: str | None = None
    pvc_mount: str = SHARED_MOUNT
    ephemeral_outputs: bool = False  # accept outputs on a pod's disk (gone with the cluster)
    storage_secret: str | None = None  # a Secret whose keys become env vars (AWS_ACCESS_KEY_ID, ...)
    namespace: str | None = None
    wandb_secret: str | None = "wandb"
    working_dir_uri: str | None = None
    submission_mode: str = "K8sJobMode"
    active_deadline_s: int | None = 24 * 3600
    ttl_s: int = 3600
    backoff_limit: int = 0
    name: str | None = None


def ray_version() -> str:
    return importlib.metadata.version("ray")


def check_options(options: K8sOptions, name: str) -> None:
    """What the CRD schema allows but KubeRay or Kubernetes would refuse later, refused now."""
    problems = []
    if options.submission_mode not in SUBMISSION_MODES:
        problems.append(f"--submission-mode: {options.submission_mode!r} is not one KubeRay accepts "
                        f"({', '.join(SUBMISSION_MODES)})")
    if not DNS_NAME.match(name) or len(name) > 47:  # KubeRay appends suffixes to the cluster name
        problems.append(f"name {name!r}: Kubernetes names are lowercase letters, digits and '-', at most 47 "
                        "characters here (use --name)")
    if options.image.split(":")[0].endswith(STOCK_RAY_IMAGE):
        problems.append(f"--image {options.image}: Ray's own image has no ftcluster; build k8s/Dockerfile (Ray "
                        f"{ray_version()} + ftcluster) and push it, then pass that image")
    if options.workers < 1:
        problems.append("--workers must be at least 1")
    if options.gpus_per_worker > options.cpus_per_worker:
        problems.append(f"--cpus-per-worker {options.cpus_per_worker}: each of the pod's {options.gpus_per_worker} "
                        "Ray Train workers (one per GPU) needs a CPU; give the pod at least as many CPUs as GPUs")
    for option, value in (("--memory-per-worker", options.memory_per_worker), ("--head-memory", options.head_memory),
                          ("--shm-size", options.shm_size)):
        if not QUANTITY.match(value):
            problems.append(f"{option} {value!r}: not a Kubernetes quantity (e.g. 64Gi, 512Mi)")
    if not options.pvc_mount.startswith("/") or options.pvc_mount.rstrip("/") in ("", JOB_MOUNT):
        problems.append(f"--pvc-mount {options.pvc_mount!r}: an absolute folder of its own, e.g. /mnt/shared")
    if options.working_dir_uri and "://" not in options.working_dir_uri:
        problems.append(f"--working-dir-uri {options.working_dir_uri}: needs a remote URI (s3://, gs://, https://); "
                        "a local path does not exist inside the pods")
    if problems:
        raise FtError("\n".join(problems))


def _on_volume(path: str, mount: str) -> bool:
    return Path(path) == Path(mount) or Path(mount) in Path(path).parents


def _placed(key: str, value: str, options: K8sOptions, default: str) -> str:
    """Where an output path of the spec lands in the pods: a URI stays; with a claim, a relative path
    goes onto the volume and an absolute one must already be on it; without one, nothing survives."""
    if is_uri(value):
        return value
    mount = options.pvc_mount.rstrip("/")
    if options.pvc:
        if not Path(value).is_absolute():
            return f"{mount}/{default}"
        if _on_volume(value, mount):
            return value
        top = "/" + Path(value).parts[1]
        raise FtError(f"{key} {value}: not on the shared volume, which --pvc mounts at {mount}; pass "
                      f"--pvc-mount {top} (mount the claim there) or set {key} under {mount}")
    if options.ephemeral_outputs:
        return value
    raise FtError(f"{key} {value}: a pod's own disk, deleted with the cluster; pass --pvc CLAIM (a shared volume), "
                  f"set {key}=s3://BUCKET/... (run storage), or --ephemeral-outputs to accept losing it")


def cluster_job_spec(spec: JobSpec, options: K8sOptions) -> JobSpec:
    """The spec as it runs in the pods: one Ray Train worker per GPU of the worker group, whose CPUs
    split the pod's; outputs and Ray Train's checkpoints where they outlive the pods."""
    per_pod = max(options.gpus_per_worker, 1)
    scaling = spec.scaling.model_copy(update={
        "num_workers": options.workers * per_pod,
        "use_gpu": options.gpus_per_worker > 0,
        "gpus_per_worker": 1,
        "cpus_per_worker": max(1, options.cpus_per_worker // per_pod),
    })
    output = _placed("output.dir", spec.output.dir, options, "runs/{name}")
    storage = scaling.storage_path
    if storage is not None:
        storage = _placed("scaling.storage_path", storage, options, "ray")
    elif options.pvc:
        storage = f"{options.pvc_mount.rstrip('/')}/ray"
    update = {"scaling": scaling.model_copy(update={"storage_path": storage}),
              "output": spec.output.model_copy(update={"dir": output})}
    if adds_wandb_tracking(spec, options):
        update["tracking"] = spec.tracking.model_copy(update={"wandb": WandbSpec()})
    return spec.model_copy(update=update)


def adds_wandb_tracking(spec: JobSpec, options: K8sOptions) -> bool:
    """The pods read a W&B Secret but the spec tracks nothing: the pods' spec tracks with the defaults
    (project ftcluster, mode auto: online where the Secret holds a key, offline files in the run otherwise),
    so the Secret does what k8s/README.md says it does."""
    return bool(options.wandb_secret) and spec.tracking.wandb is None


def job_files(spec: JobSpec, options: K8sOptions, space: Path | None) -> dict[str, str]:
    """The ConfigMap's files: the spec with data paths inside the mount, small data files, the space."""
    files: dict[str, str] = {}
    data_update = {}
    for key in ("train", "validation"):
        value = getattr(spec.data, key)
        if not value:
            continue
        if is_remote(value) or _on_volume(value, options.pvc_mount):
            continue  # read where it is: object storage, the hub, or the shared volume
        source = Path(value)
        if not source.is_file():
            raise FtError(f"data.{key}: {value} is a folder or a glob of files, which a ConfigMap cannot carry; copy it to "
                          f"the shared volume (--pvc, mounted at {options.pvc_mount}) or into object storage (s3://...) "
                          f"and point data.{key} there")
        name = f"{key}-{source.name}"
        files[name] = source.read_text()
        data_update[key] = f"{JOB_MOUNT}/{name}"
    job = spec.model_copy(update={"data": spec.data.model_copy(update=data_update)})
    if space is not None:
        files["space.yaml"] = space.read_text()
    size = sum(len(text.encode()) for text in files.values())
    if size > CONFIGMAP_LIMIT:
        raise FtError(f"data: {size / 1024:.0f} KiB of local data is too big for a ConfigMap (1 MiB); copy it to the "
                      f"shared volume (--pvc, mounted at {options.pvc_mount}) and point data.train there, or into "
                      "object storage (s3://...)")
    files["job.yaml"] = dump_spec(job)
    return files


@dataclass
class CodeFile:
    """A file of the user's modules in the ConfigMap: `key` is flat, `path` (my_pkg/scoring.py) where
    the pods see it under the mount."""

    key: str
    path: str
    content: bytes


def code_files(spec: JobSpec) -> list[CodeFile]:
    """The files of the local modules the spec names (user_code), keyed by their place in the list
    (code-3-scoring.py: keys are unique, paths are free)."""
    shipped = [pair for module in find_user_code(spec).local for pair in module.files()]
    return [CodeFile(f"code-{index}-{re.sub(r'[^-._a-zA-Z0-9]', '_', path.name)[:200]}", path.as_posix(),
                     source.read_bytes()) for index, (source, path) in enumerate(shipped)]


def configmap_content(files: dict[str, str], code: list[CodeFile]) -> dict[str, dict[str, str]]:
    """The ConfigMap's `data` (text) and, for code files that are not UTF-8 text, `binaryData` (base64);
    all of it within a ConfigMap's size."""
    data, binary = dict(files), {}
    for file in code:
        try:
            data[file.key] = file.content.decode()
        except UnicodeDecodeError:
            binary[file.key] = base64.b64encode(file.content).decode()
    size = sum(len(value.encode()) for value in [*data.values(), *binary.values()])
    if size > CONFIGMAP_LIMIT:
        modules = sorted({file.path.split("/")[0] for file in code})
        raise FtError(f"code: your modules ({', '.join(modules)}) and the job's files come to {size / 1024:.0f} KiB, "
                      "too big for a ConfigMap (1 MiB); build the code into the image (pip install it in "
                      "k8s/Dockerfile, and here, so it is not shipped)")
    return {"data": data, **({"binaryData": binary} if binary else {})}


@dataclass
class JobVolume:
    """The ConfigMap every pod mounts at JOB_MOUNT; with the user's code, the `items` that rebuild its
    folders (every key must then be listed) and the mount on PYTHONPATH."""

    configmap: str
    items: list[dict[str, str]] | None = None

    @classmethod
    def of(cls, configmap: str, files: dict[str, str], code: list[CodeFile]) -> JobVolume:
        if not code:
            return cls(configmap)
        return cls(configmap, [{"key": key, "path": key} for key in files] +
                   [{"key": file.key, "path": file.path} for file in code])


def _env(options: K8sOptions, volume: JobVolume) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "RAY_TRAIN_ENABLE_PRINT_PATCH", "value": "0"}]
    if volume.items is not None:  # the user's modules: importable by the entrypoint and every Ray worker
        env.append({"name": "PYTHONPATH", "value": JOB_MOUNT})
    if options.wandb_secret:
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": options.wandb_secret, "key": "api-key", "optional": True}}})
    return env


def _volumes(options: K8sOptions, volume: JobVolume) -> tuple[list[dict], list[dict]]:
    configmap: dict[str, Any] = {"name": volume.configmap}
    if volume.items is not None:
        configmap["items"] = volume.items
    volumes: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                           {"name": "job", "configMap": configmap}]
    mounts: list[dict] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True}]
    if options.pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": options.pvc}})
        mounts.append({"name": "shared", "mountPath": options.pvc_mount})
    return volumes, mounts


def _container(name: str, options: K8sOptions, cpus: int, memory: str, gpus: int, mounts: list[dict],
               env: list[dict[str, Any]]) -> dict:
    resources: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    container = {
        "name": name,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "env": env,
        "volumeMounts": mounts,
    }
    if options.storage_secret:  # the store's credentials, by reference: never in the manifest
        container["envFrom"] = [{"secretRef": {"name": options.storage_secret}}]
    if name == "ray-head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    return container


def cluster_spec(options: K8sOptions, volume: JobVolume, head_cpus: int = 0) -> dict[str, Any]:
    """The RayCluster spec: a CPU head that runs no training (offering Ray `head_cpus`: a sweep's trial
    drivers), and one GPU (or CPU) worker group."""
    volumes, mounts = _volumes(options, volume)
    env = _env(options, volume)
    head = _container("ray-head", options, options.head_cpus, options.head_memory, 0, mounts, env)
    worker = _container("ray-worker", options, options.cpus_per_worker, options.memory_per_worker,
                        options.gpus_per_worker, mounts, env)
    worker_pod: dict[str, Any] = {"containers": [worker], "volumes": volumes}
    if options.node_selector:
        worker_pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        worker_pod["tolerations"] = [dict(t) for t in options.tolerations]
    return {
        "rayVersion": ray_version(),
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # The head schedules no training (no CPU or GPU to offer); it runs the driver and the dashboard.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": str(head_cpus), "num-gpus": "0",
                               **({"resources": json.dumps(json.dumps({TRIAL_DRIVER_RESOURCE: 100}))} if head_cpus else {})},
            "template": {"spec": {"containers": [head], "volumes": volumes}},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if options.gpus_per_worker else "cpu-workers",
            "replicas": options.workers,
            "minReplicas": options.workers,
            "maxReplicas": options.workers,
            "rayStartParams": {},
            "template": {"spec": worker_pod},
        }],
    }


def trial_driver_cpus(spec: JobSpec, space: Path | None) -> int:
    """The CPUs the head offers a sweep's trial drivers: each trial that starts a worker group reserves
    `TRIAL_DRIVER_CPUS` beyond its workers, and the worker pods have none to spare. In the pods a trial's
    group takes every GPU, so one trial runs at a time and one CPU holds its driver."""
    if space is None or spec.scaling.num_workers < 2:
        return 0  # a single-worker trial reserves its worker's own bundle, nothing beside it
    return math.ceil(TRIAL_DRIVER_CPUS)


def _metadata(name: str, options: K8sOptions, spec: JobSpec) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "labels": {"app.kubernetes.io/name": "ftcluster",
                                                          "app.kubernetes.io/component": "fine-tune",
                                                          "ftcluster.io/job": spec.name.lower()[:63]}}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return metadata


def render(spec: JobSpec, options: K8sOptions, space: Path | None = None, tune_args: list[str] | None = None,
           cluster_only: bool = False) -> list[dict[str, Any]]:
    """The manifests: a ConfigMap with the job files, then a RayJob (or a RayCluster)."""
    name = options.name or re.sub(r"[^a-z0-9-]", "-", spec.name.lower()).strip("-")
    check_options(options, name)
    files, code = job_files(cluster_job_spec(spec, options), options, space), code_files(spec)
    volume = JobVolume.of(f"{name}-job", files, code)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(volume.configmap, options, spec),
                 **configmap_content(files, code)}
    if cluster_only:
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(name, options, spec),
                   "spec": cluster_spec(options, volume)}
        return [configmap, cluster]
    if space is not None:
        entrypoint = ["ftcluster", "tune", f"{JOB_MOUNT}/job.yaml", f"{JOB_MOUNT}/space.yaml", *(tune_args or [])]
    else:
        entrypoint = ["ftcluster", "train", f"{JOB_MOUNT}/job.yaml"]
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if options.working_dir_uri:
        runtime_env["working_dir"] = options.working_dir_uri
    ray_job: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, options, spec),
        "spec": {
            "entrypoint": " ".join(entrypoint),
            "runtimeEnvYAML": yaml.safe_dump(runtime_env, sort_keys=False),
            "submissionMode": options.submission_mode,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": options.ttl_s,
            "backoffLimit": options.backoff_limit,
            # The driver reserves nothing, so it runs on the head (which offers nothing) and every
            # worker CPU is left to the workers: one reserved CPU made 8-GPU pods unplaceable.
            "rayClusterSpec": cluster_spec(options, volume, trial_driver_cpus(cluster_job_spec(spec, options), space)),
        },
    }
    if options.active_deadline_s:
        ray_job["spec"]["activeDeadlineSeconds"] = options.active_deadline_s
    return [configmap, ray_job]


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (files in the ConfigMap, runtimeEnvYAML) as readable `|` blocks; no
    &anchors, which kubectl accepts but people reading the manifest should not have to follow."""

    def ignore_aliases(self, data) -> bool:
        return True


def _represent_text(dumper: yaml.SafeDumper, text: str):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _represent_text)


def dump_manifests(documents: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(doc, Dumper=_BlockDumper, sort_keys=False, width=120) for doc in documents)
