"""KubeRay manifests (rendered and shipped in k8s/) and `ray up` configs (cluster/), validated."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from kube_schema import KUBERAY, core_errors, load_documents, manifest_errors

from ftcluster.spec import build_spec, load_spec

needs_crds = pytest.mark.skipif(not KUBERAY.is_dir(), reason=f"KubeRay CRD schemas not found at {KUBERAY}")
IMAGE = "ghcr.io/acme/ftcluster:0.1"


def render(cli, tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "manifests.yaml"
    result = cli("render", "k8s", *args, "--image", IMAGE, "--out", out)
    assert result.code == 0, result
    return load_documents(out)


@needs_crds
@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_shipped_job_renders_a_valid_rayjob(job, cli, tmp_path):
    documents = render(cli, tmp_path, str(REPO / "jobs" / job), "--workers", "2", "--gpus-per-worker", "8",
                       "--pvc", "shared", "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
                       "--toleration", "nvidia.com/gpu:NoSchedule")
    assert [d["kind"] for d in documents] == ["ConfigMap", "RayJob"]
    for document in documents:
        assert manifest_errors(document) == [], document["kind"]


@needs_crds
def test_rayjob_carries_the_job_and_never_the_key(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-123")
    configmap, rayjob = render(cli, tmp_path, str(REPO / "jobs" / "llama-7b-lora-ddp.yaml"), "--workers", "2",
                               "--gpus-per-worker", "8", "--pvc", "shared", "--active-deadline-s", "7200",
                               "--ttl-s", "600", "--backoff-limit", "1", "--toleration", "nvidia.com/gpu:NoSchedule")
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "ftcluster train /etc/ftcluster/job/job.yaml"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert spec["activeDeadlineSeconds"] == 7200 and spec["backoffLimit"] == 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["PYTHONUNBUFFERED"] == "1"
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster["rayVersion"] == ray.__version__ and cluster["authOptions"] == {"mode": "token"}
    worker = cluster["workerGroupSpecs"][0]
    assert worker["replicas"] == worker["minReplicas"] == worker["maxReplicas"] == 2
    pod = worker["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
    assert {"name": "shared", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    key_env = next(e for e in container["env"] if e["name"] == "WANDB_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "wandb", "key": "api-key", "optional": True}
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]  # GPUs go to the workers only
    job_spec = build_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert job_spec.scaling.num_workers == 16 and job_spec.scaling.use_gpu and job_spec.scaling.gpus_per_worker == 1
    assert job_spec.output.dir == "/shared/ftcluster/runs/llama-7b-lora-ddp"  # the spec's own absolute path is kept
    assert job_spec.scaling.storage_path == "/shared/ftcluster/ray"  # so is its storage path
    assert job_spec.data.train.startswith("/etc/ftcluster/job/") and job_spec.data.train.split("/")[-1] in configmap["data"]
    text = yaml.safe_dump_all([configmap, rayjob])
    assert "wandb-secret-value-123" not in text


@needs_crds
def test_cluster_only_and_tune(cli, tmp_path):
    cluster_configmap, cluster = render(cli, tmp_path, str(REPO / "jobs" / "quickstart.yaml"), "--cluster-only",
                                        "--pvc", "shared")
    assert cluster["kind"] == "RayCluster" and manifest_errors(cluster) == []
    relative_output = build_spec(yaml.safe_load(cluster_configmap["data"]["job.yaml"])).output.dir
    assert relative_output == "/mnt/shared/runs/{name}"  # runs/quickstart would vanish with the pod
    storage = build_spec(yaml.safe_load(cluster_configmap["data"]["job.yaml"])).scaling.storage_path
    assert storage == "/mnt/shared/ray"  # multi-node checkpoints on the shared volume
    documents = render(cli, tmp_path, str(REPO / "jobs" / "quickstart.yaml"), "--tune",
                       str(REPO / "tune_spaces" / "lora.yaml"), "--tune-options", "--trials 16 --concurrent 4")
    configmap, rayjob = documents
    assert "space.yaml" in configmap["data"]
    assert rayjob["spec"]["entrypoint"].endswith("space.yaml --trials 16 --concurrent 4")
    assert manifest_errors(rayjob) == []


@needs_crds
def test_validator_catches_what_the_api_server_would(cli, tmp_path):
    _, rayjob = render(cli, tmp_path, str(REPO / "jobs" / "quickstart.yaml"))
    broken = copy.deepcopy(rayjob)
    broken["spec"]["entrypointt"] = "typo"
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    problems = manifest_errors(broken)
    assert any("'entrypointt' was unexpected" in p for p in problems)
    assert any("replicas: 'two' is not of type 'integer'" in p for p in problems)
    broken = copy.deepcopy(rayjob)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "x"
    assert any("pod template 0" in p for p in manifest_errors(broken))


def test_values_kuberay_restricts_are_refused(cli, tmp_path):
    job = str(REPO / "jobs" / "quickstart.yaml")
    result = cli("render", "k8s", job, "--image", IMAGE, "--submission-mode", "BatchMode")
    assert result.code == 2 and "--submission-mode: 'BatchMode' is not one KubeRay accepts" in result.err
    result = cli("render", "k8s", job, "--image", "rayproject/ray:2.9.0-gpu")
    assert result.code == 2 and "ftcluster pins Ray 2.60.0" in result.err
    result = cli("render", "k8s", job, "--image", IMAGE, "--working-dir-uri", "/home/me/code")
    assert result.code == 2 and "needs a remote URI" in result.err
    result = cli("render", "k8s", job, "--image", IMAGE, "--toleration", "gpu")
    assert result.code == 2 and "expected KEY[=VALUE]:EFFECT" in result.err


def json_patch(document: dict, operations: list[dict]) -> dict:
    """The `add` / `replace` operations of RFC 6902 that the overlays use."""
    document = copy.deepcopy(document)
    for operation in operations:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].lstrip("/").split("/")]
        parent = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if operation["op"] == "replace":
            key = int(last) if isinstance(parent, list) else last
            assert key in parent or isinstance(parent, list), operation["path"]
            parent[key] = operation["value"]
        elif operation["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), operation["value"])
            else:
                parent[last] = operation["value"]
        else:
            raise AssertionError(f"unsupported op {operation['op']}")
    return document


def kustomize(folder: Path) -> list[dict]:
    """Build a kustomization the way `kubectl kustomize` would for the features used here."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    documents = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        documents += kustomize(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        operations = yaml.safe_load(patch["patch"])
        matched = [i for i, d in enumerate(documents)
                   if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert matched, f"{folder}: patch target {target} matches nothing"
        for index in matched:
            documents[index] = json_patch(documents[index], operations)
    return documents


@needs_crds
@pytest.mark.parametrize("overlay", ["base", "overlays/cpu-dev", "overlays/gpu-a100x8", "overlays/gpu-h100x8"])
def test_k8s_folder_validates(overlay):
    documents = kustomize(REPO / "k8s" / overlay)
    assert {d["kind"] for d in documents} == {"PersistentVolumeClaim", "Secret", "RayCluster", "RayJob"}
    for document in documents:
        assert manifest_errors(document) == [], (overlay, document["kind"])
        if document["kind"] == "Secret":
            assert not any(document.get("stringData", {}).values())  # a template, never a real key
        if document["kind"] == "RayJob":  # the entrypoint's spec + overrides is a valid job
            words = document["spec"]["entrypoint"].split()
            spec = load_spec(REPO / "jobs" / Path(words[2]).name, [w for w in words[3:] if "=" in w])
            if "gpu" in overlay:
                assert spec.scaling.use_gpu and spec.scaling.num_workers == 8


def test_ray_up_configs_validate_against_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    configs = sorted((REPO / "cluster").glob("*.yaml"))
    assert {p.name for p in configs} == {"local.yaml", "aws-gpu.yaml"}
    for path in configs:
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    broken = yaml.safe_load(configs[0].read_text())
    broken["provider"]["tyep"] = broken["provider"].pop("type")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_core_schema_rejects_bad_pvc():
    pvc = load_documents(REPO / "k8s" / "base" / "pvc.yaml")[0]
    assert core_errors(pvc) == []
    pvc["spec"]["accessMode"] = ["ReadWriteOnce"]
    assert core_errors(pvc)
