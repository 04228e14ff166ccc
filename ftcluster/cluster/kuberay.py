"""KubeRay manifests for a job spec: a RayJob (cluster created for the job, deleted after it) or a
standalone RayCluster that `ftcluster submit` can target.

The job spec (and small data files) travel in a ConfigMap mounted into every pod; big data and
outputs belong on a shared volume (`--pvc`). ftcluster and its dependencies come from the image
(see k8s/Dockerfile), or from a remote `working_dir` URI; a local path would not exist in a pod.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftcluster.errors import FtError
from ftcluster.spec import JobSpec, dump_spec

# Values the CRD leaves as free strings but KubeRay's operator accepts only from this list.
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
JOB_MOUNT = "/etc/ftcluster/job"
SHARED_MOUNT = "/mnt/shared"
CONFIGMAP_LIMIT = 900 * 1024  # Kubernetes caps a ConfigMap at 1 MiB; leave room for metadata
GPU_RESOURCE = "nvidia.com/gpu"
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


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
    tag = options.image.rsplit(":", 1)[-1] if ":" in options.image.rsplit("/", 1)[-1] else ""
    if options.image.split(":")[0].endswith("rayproject/ray") and not tag.startswith(ray_version()):
        problems.append(f"--image {options.image}: ftcluster pins Ray {ray_version()}; use a {ray_version()} image "
                        "(or the k8s/Dockerfile image built from it)")
    if options.workers < 1:
        problems.append("--workers must be at least 1")
    if options.working_dir_uri and "://" not in options.working_dir_uri:
        problems.append(f"--working-dir-uri {options.working_dir_uri}: needs a remote URI (s3://, gs://, https://); "
                        "a local path does not exist inside the pods")
    if problems:
        raise FtError("\n".join(problems))


def cluster_job_spec(spec: JobSpec, options: K8sOptions) -> JobSpec:
    """The spec as it runs in the pods: one Ray Train worker per GPU of the worker group, outputs and
    Ray Train's checkpoints on the shared volume when there is one."""
    per_pod = max(options.gpus_per_worker, 1)
    scaling = spec.scaling.model_copy(update={
        "num_workers": options.workers * per_pod,
        "use_gpu": options.gpus_per_worker > 0,
        "gpus_per_worker": 1,
        "cpus_per_worker": max(1, (options.cpus_per_worker - 1) // per_pod),  # one CPU left for Ray itself
    })
    update: dict[str, Any] = {"scaling": scaling}
    if options.pvc:
        if not Path(spec.output.dir).is_absolute():
            update["output"] = spec.output.model_copy(update={"dir": f"{SHARED_MOUNT}/runs/{{name}}"})
        if scaling.storage_path is None:
            update["scaling"] = scaling.model_copy(update={"storage_path": f"{SHARED_MOUNT}/ray"})
    return spec.model_copy(update=update)


def job_files(spec: JobSpec, space: Path | None) -> dict[str, str]:
    """The ConfigMap's files: the spec with data paths inside the mount, small data files, the space."""
    files: dict[str, str] = {}
    data_update = {}
    for key in ("train", "validation"):
        value = getattr(spec.data, key)
        if not value:
            continue
        if value.startswith(SHARED_MOUNT):
            continue  # already on the shared volume
        source = Path(value)
        name = f"{key}-{source.name}"
        files[name] = source.read_text()
        data_update[key] = f"{JOB_MOUNT}/{name}"
    job = spec.model_copy(update={"data": spec.data.model_copy(update=data_update)})
    if space is not None:
        files["space.yaml"] = space.read_text()
    size = sum(len(text.encode()) for text in files.values())
    if size > CONFIGMAP_LIMIT:
        raise FtError(f"data: {size / 1024:.0f} KiB of local data is too big for a ConfigMap (1 MiB); copy it to the "
                      f"shared volume (--pvc, mounted at {SHARED_MOUNT}) and point data.train at {SHARED_MOUNT}/...")
    files["job.yaml"] = dump_spec(job)
    return files


def _env(options: K8sOptions) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "RAY_TRAIN_ENABLE_PRINT_PATCH", "value": "0"}]
    if options.wandb_secret:
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": options.wandb_secret, "key": "api-key", "optional": True}}})
    return env


def _volumes(options: K8sOptions, configmap: str) -> tuple[list[dict], list[dict]]:
    volumes: list[dict] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}},
                           {"name": "job", "configMap": {"name": configmap}}]
    mounts: list[dict] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "job", "mountPath": JOB_MOUNT, "readOnly": True}]
    if options.pvc:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": options.pvc}})
        mounts.append({"name": "shared", "mountPath": SHARED_MOUNT})
    return volumes, mounts


def _container(name: str, options: K8sOptions, cpus: int, memory: str, gpus: int, mounts: list[dict]) -> dict:
    resources: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
    container = {
        "name": name,
        "image": options.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"limits": dict(resources), "requests": dict(resources)},
        "env": _env(options),
        "volumeMounts": mounts,
    }
    if name == "ray-head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    return container


def cluster_spec(options: K8sOptions, configmap: str) -> dict[str, Any]:
    """The RayCluster spec: a CPU head that runs no training, and one GPU (or CPU) worker group."""
    volumes, mounts = _volumes(options, configmap)
    head = _container("ray-head", options, options.head_cpus, options.head_memory, 0, mounts)
    worker = _container("ray-worker", options, options.cpus_per_worker, options.memory_per_worker,
                        options.gpus_per_worker, mounts)
    worker_pod: dict[str, Any] = {"containers": [worker], "volumes": volumes}
    if options.node_selector:
        worker_pod["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        worker_pod["tolerations"] = [dict(t) for t in options.tolerations]
    return {
        "rayVersion": ray_version(),
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # num-cpus 0: the head schedules no training; it runs the driver and the dashboard.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
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
    files = job_files(cluster_job_spec(spec, options), space)
    configmap_name = f"{name}-job"
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(configmap_name, options, spec),
                 "data": files}
    if cluster_only:
        cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(name, options, spec),
                   "spec": cluster_spec(options, configmap_name)}
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
            "entrypointNumCpus": 1,
            "rayClusterSpec": cluster_spec(options, configmap_name),
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
