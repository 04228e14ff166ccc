"""KubeRay manifests (rendered and shipped in k8s/) and `ray up` configs (cluster/), validated."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, read_metrics
from kube_schema import KUBERAY, core_errors, load_documents, manifest_errors
from test_grpo import grpo_job, prompt_files

from ftcluster.cluster.kuberay import JOB_MOUNT
from ftcluster.config.spec import build_spec, load_spec

needs_crds = pytest.mark.skipif(not KUBERAY.is_dir(), reason=f"KubeRay CRD schemas not found at {KUBERAY}")
IMAGE = "ghcr.io/acme/ftcluster:0.1"


def render(cli, tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "manifests.yaml"
    result = cli("render", "k8s", *args, "--image", IMAGE, "--out", out)
    assert result.code == 0, result
    return load_documents(out)


def ray_nodes(cluster: dict) -> list[dict[str, float]]:
    """What Ray sees in a RayCluster spec: one node per pod, CPUs and GPUs from the container limits
    unless rayStartParams say otherwise (the head offers num-cpus / num-gpus)."""

    def node(group: dict) -> dict[str, float]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        custom = json.loads(json.loads(params["resources"])) if "resources" in params else {}
        return {"CPU": float(params.get("num-cpus", limits["cpu"])),
                "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))), **custom}

    nodes = [node(cluster["headGroupSpec"])]
    for group in cluster["workerGroupSpecs"]:
        nodes += [node(group)] * group["maxReplicas"]
    return nodes


def assert_job_fits(spec, rayjob: dict) -> None:
    """Every worker's bundle, and the driver's entrypoint CPUs, placed on the pods the RayJob creates."""
    from ftcluster.planning.capacity import workers_that_fit

    nodes = ray_nodes(rayjob["spec"]["rayClusterSpec"])
    driver = float(rayjob["spec"].get("entrypointNumCpus", 0))
    fit = workers_that_fit(spec, nodes, driver_cpus=driver)
    assert fit >= spec.scaling.num_workers, (nodes, spec.scaling.num_workers, spec.scaling.cpus_per_worker, driver)


SHAPES = [("1", "8", "8"), ("2", "8", "8"), ("2", "4", "16"), ("1", "1", "8"), ("3", "0", "4")]


@needs_crds
@pytest.mark.parametrize("job", sorted(p.name for p in (REPO / "jobs").glob("*.yaml")))
def test_every_shipped_job_renders_a_valid_rayjob_that_fits_its_pods(job, cli, tmp_path):
    for workers, gpus, cpus in SHAPES:
        documents = render(cli, tmp_path, str(REPO / "jobs" / job), "--workers", workers, "--gpus-per-worker", gpus,
                           "--cpus-per-worker", cpus, "--pvc", "shared", "--pvc-mount", "/shared",
                           "--node-selector", "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3",
                           "--toleration", "nvidia.com/gpu:NoSchedule")
        assert [d["kind"] for d in documents] == ["ConfigMap", "RayJob"]
        configmap, rayjob = documents
        for document in documents:
            assert manifest_errors(document) == [], document["kind"]
        spec = build_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
        assert spec.scaling.num_workers == int(workers) * max(int(gpus), 1) and spec.scaling.use_gpu == (gpus != "0")
        assert_job_fits(spec, rayjob)


@needs_crds
def test_rayjob_carries_the_job_and_never_the_key(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-123")
    configmap, rayjob = render(cli, tmp_path, str(REPO / "jobs" / "llama-7b-lora-ddp.yaml"), "--workers", "2",
                               "--gpus-per-worker", "8", "--pvc", "shared", "--pvc-mount", "/shared",
                               "--active-deadline-s", "7200",
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
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # and Ray on the head offers none
    assert "entrypointNumCpus" not in spec  # the driver runs on the head and reserves no worker CPU
    job_spec = build_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert job_spec.scaling.num_workers == 16 and job_spec.scaling.use_gpu and job_spec.scaling.gpus_per_worker == 1
    assert job_spec.output.dir == "/shared/ftcluster/runs/llama-7b-lora-ddp"  # on the claim, mounted at /shared
    assert job_spec.scaling.storage_path == "/shared/ftcluster/ray"  # so is its storage path
    assert {"name": "shared", "mountPath": "/shared"} in container["volumeMounts"]
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
                       str(REPO / "tune_spaces" / "lora.yaml"), "--tune-options", "--trials 16 --concurrent 4",
                       "--ephemeral-outputs")
    configmap, rayjob = documents
    assert "space.yaml" in configmap["data"]
    assert rayjob["spec"]["entrypoint"].endswith("space.yaml --trials 16 --concurrent 4")
    assert manifest_errors(rayjob) == []


@needs_crds
def test_validator_catches_what_the_api_server_would(cli, tmp_path):
    _, rayjob = render(cli, tmp_path, str(REPO / "jobs" / "quickstart.yaml"), "--ephemeral-outputs")
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

    def refused(*args: str) -> str:
        result = cli("render", "k8s", job, "--ephemeral-outputs", *args)
        assert result.code == 2, result
        return result.err

    assert "--submission-mode: 'BatchMode' is not one KubeRay accepts" in refused("--image", IMAGE, "--submission-mode",
                                                                                   "BatchMode")
    assert "Ray's own image has no ftcluster; build k8s/Dockerfile" in refused("--image", "rayproject/ray:2.60.0-gpu")
    assert "needs a remote URI" in refused("--image", IMAGE, "--working-dir-uri", "/home/me/code")
    assert "expected KEY[=VALUE]:EFFECT" in refused("--image", IMAGE, "--toleration", "gpu")
    assert "--memory-per-worker '64GB': not a Kubernetes quantity" in refused("--image", IMAGE, "--memory-per-worker",
                                                                               "64GB")
    assert "each of the pod's 8 Ray Train workers (one per GPU) needs a CPU" in refused(
        "--image", IMAGE, "--gpus-per-worker", "8", "--cpus-per-worker", "4")
    assert "No such option: --trails" in refused("--image", IMAGE, "--tune", str(REPO / "tune_spaces" / "lora.yaml"),
                                                 "--tune-options", "--trails 3")
    assert "Invalid value for '--workers'" in refused("--image", IMAGE, "--workers", "0")


@needs_crds
def test_outputs_must_outlive_the_pods(cli, tmp_path):
    """Without a shared volume or run storage, a RayJob's outputs die with its cluster: refused unless asked."""
    lost = cli("render", "k8s", str(REPO / "jobs" / "quickstart.yaml"), "--image", IMAGE)
    assert lost.code == 2 and "output.dir runs/quickstart: a pod's own disk, deleted with the cluster" in lost.err
    llama = str(REPO / "jobs" / "llama-7b-lora-ddp.yaml")
    elsewhere = cli("render", "k8s", llama, "--image", IMAGE, "--pvc", "shared")
    assert elsewhere.code == 2
    assert ("output.dir /shared/ftcluster/runs/llama-7b-lora-ddp: not on the shared volume, which --pvc mounts at "
            "/mnt/shared; pass --pvc-mount /shared") in elsewhere.err
    configmap, rayjob = render(cli, tmp_path, llama, "output.dir=s3://bucket/runs/{name}", "scaling.storage_path=null",
                               "--storage-secret", "s3-credentials")
    spec = build_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    assert spec.output.dir == "s3://bucket/runs/{name}" and spec.scaling.storage_path is None  # Ray's copy: URI/ray
    for group in [rayjob["spec"]["rayClusterSpec"]["headGroupSpec"], *rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert manifest_errors(rayjob) == []
    shards = REPO / "jobs" / "data" / "*.jsonl"  # a glob of files: not what a ConfigMap carries
    folded = cli("render", "k8s", llama, f"data.train={shards}", "output.dir=s3://bucket/runs/{name}",
                 "scaling.storage_path=null", "--image", IMAGE)
    assert folded.code == 2 and "is a folder or a glob of files, which a ConfigMap cannot carry" in folded.err
    configmap, _ = render(cli, tmp_path, llama, "data.train=s3://bucket/data/part-*.parquet",
                          "output.dir=s3://bucket/runs/{name}", "scaling.storage_path=null")
    assert build_spec(yaml.safe_load(configmap["data"]["job.yaml"])).data.train == "s3://bucket/data/part-*.parquet"


def built(folder: Path) -> list[dict]:
    """The overlay as `kubectl kustomize` builds it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (it builds the kustomizations)")
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


OVERLAYS = {"overlays/cpu-dev": "RayCluster", "overlays/gpu-a100x8": "RayJob", "overlays/gpu-h100x8": "RayJob",
            "base/job": "RayJob", "base/cluster": "RayCluster"}


@needs_crds
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_each_overlay_is_one_thing_and_validates(overlay):
    """A RayJob (its cluster made for it) or a standing RayCluster, never both: two would book the GPUs
    twice. No Secret is shipped (applying one would blank the key a user created)."""
    documents = built(REPO / "k8s" / overlay)
    assert sorted(d["kind"] for d in documents) == sorted(["PersistentVolumeClaim", OVERLAYS[overlay]])
    for document in documents:
        assert manifest_errors(document) == [], (overlay, document["kind"])
        if document["kind"] == "RayJob":  # the entrypoint's spec + overrides is a valid job that fits the pods
            words = document["spec"]["entrypoint"].split()
            spec = load_spec(REPO / "jobs" / Path(words[2]).name, [w for w in words[3:] if "=" in w])
            assert_job_fits(spec, document)
            assert spec.tracking.wandb is not None  # the wandb Secret's key is used (k8s/README.md step 3)
            if "gpu" in overlay:
                assert spec.scaling.use_gpu and spec.scaling.num_workers == 8
        if document["kind"] == "RayCluster":
            assert document["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"


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
    pvc = load_documents(REPO / "k8s" / "base" / "storage" / "pvc.yaml")[0]
    assert core_errors(pvc) == []
    pvc["spec"]["accessMode"] = ["ReadWriteOnce"]
    assert core_errors(pvc)


def test_the_help_examples_render(cli, tmp_path, monkeypatch):
    """Every `render k8s` example in its --help runs as printed (one broke when outputs on a pod's disk
    began to be refused)."""
    import shlex

    import typer

    from ftcluster.cli.app import app

    monkeypatch.chdir(REPO)
    epilog = typer.main.get_command(app).commands["render"].commands["k8s"].epilog
    examples = [line.strip() for line in epilog.splitlines() if line.strip().startswith("ftcluster render k8s")]
    assert len(examples) >= 3
    for example in examples:
        words = shlex.split(example)[1:]
        if "--out" in words:
            words[words.index("--out") + 1] = str(tmp_path / "out.yaml")
        result = cli(*words)
        assert result.code == 0, (example, result)


def place_on_nodes(nodes: list[dict[str, float]], groups: list[tuple[list[dict], str]], timeout_s: float = 20) -> bool:
    """Start a Ray cluster with exactly these nodes (ray.cluster_utils, 127.0.0.1) and ask it for these
    placement groups, one after another as a sweep's trial and then its worker group ask: all placed?"""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group

    def node_args(node: dict[str, float]) -> dict:
        custom = {key: value for key, value in node.items() if key not in ("CPU", "GPU")}
        return {"num_cpus": int(node["CPU"]), "num_gpus": int(node["GPU"]), "resources": custom,
                "node_ip_address": "127.0.0.1"}

    head, *workers = nodes
    cluster = Cluster(initialize_head=True, head_node_args={**node_args(head), "include_dashboard": False})
    try:
        for node in workers:
            cluster.add_node(**node_args(node))
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        groups_placed = [placement_group(bundles(), strategy=strategy) for bundles, strategy in groups]
        return all(group.wait(timeout_seconds=timeout_s) for group in groups_placed)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.integration
def test_a_sweep_manifests_trial_and_its_worker_group_are_placed_on_its_pods(cli, tmp_path):
    """`render k8s --tune` with 2 one-GPU pods: each trial reserves a driver share beside its 2 workers.
    The pods' resources, started as Ray nodes, hold the trial and its group (the head offers the driver's
    CPU); with the head offering none, as before, the group is never placed."""
    from ftcluster.planning.capacity import worker_resources
    from ftcluster.sweep.space import load_space
    from ftcluster.sweep.trial import SweepSetup

    configmap, rayjob = render(cli, tmp_path, str(REPO / "jobs" / "quickstart.yaml"), "--tune",
                               str(REPO / "tune_spaces" / "lora.yaml"), "--workers", "2", "--gpus-per-worker", "1",
                               "--cpus-per-worker", "8", "--ephemeral-outputs")
    spec = build_spec(yaml.safe_load(configmap["data"]["job.yaml"]))
    base = spec.model_dump(mode="json")
    (tmp_path / "space.yaml").write_text(configmap["data"]["space.yaml"])
    space = load_space(tmp_path / "space.yaml", base)
    chosen = {"training.lr": 1e-3, "method.lora.rank": 8, "method.lora.target_modules": "all-linear",
              "training.batch_size": 4, "training.warmup_steps": 0}
    setup = SweepSetup(name="s", location=str(tmp_path), base=base, space=space)
    workers = [worker_resources(spec)] * spec.scaling.num_workers
    # the trial's reservation is asked on the cluster it runs on, as the sweep driver asks it
    groups = [(lambda: setup.resources(chosen).bundles, "PACK"), (lambda: workers, spec.scaling.placement_strategy)]
    if KUBERAY.is_dir():
        assert manifest_errors(rayjob) == []
    cluster = rayjob["spec"]["rayClusterSpec"]
    nodes = ray_nodes(cluster)
    assert sum(node["CPU"] for node in nodes[1:]) == sum(bundle["CPU"] for bundle in workers)  # workers take every pod CPU
    assert place_on_nodes(nodes, groups)
    params = cluster["headGroupSpec"]["rayStartParams"]
    params["num-cpus"] = "0"  # the manifest before: 16.25 CPUs asked of 16
    del params["resources"]
    assert not place_on_nodes(ray_nodes(cluster), groups, timeout_s=5)


def shipped_entrypoints() -> list[str]:
    """The `ftcluster train` commands the shipped RayJobs run: the base's, and each overlay's replacement."""
    base = yaml.safe_load((REPO / "k8s" / "base" / "job" / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    patched = re.findall(r'path: /spec/entrypoint, value: "([^"]+)"',
                         "".join(p.read_text() for p in (REPO / "k8s" / "overlays").glob("*/kustomization.yaml")))
    return [base, *patched]


def test_the_wandb_secret_makes_runs_track(cli, tmp_path):
    """k8s/README step 3: with the `wandb` Secret, runs upload. The shipped RayJobs' specs track, and
    `render` makes a spec without tracking.wandb track in the pods (saying so), unless told not to."""
    entrypoints = shipped_entrypoints()
    assert len(entrypoints) == 3
    for entrypoint in entrypoints:
        words = entrypoint.split()
        spec = load_spec(REPO / "jobs" / Path(words[2]).name, [w for w in words[3:] if "=" in w])
        assert spec.tracking.wandb is not None and spec.tracking.wandb.mode == "auto", entrypoint
    out = tmp_path / "m.yaml"
    quickstart = str(REPO / "jobs" / "quickstart.yaml")
    result = cli("render", "k8s", quickstart, "--image", IMAGE, "--ephemeral-outputs", "--out", out)
    assert result.code == 0 and "tracking.wandb.project=NAME" in result.err, result
    pods_spec = build_spec(yaml.safe_load(load_documents(out)[0]["data"]["job.yaml"]))
    assert pods_spec.tracking.wandb is not None and pods_spec.tracking.wandb.project == "ftcluster"
    result = cli("render", "k8s", quickstart, "--image", IMAGE, "--ephemeral-outputs", "--wandb-secret", "",
                 "--out", out)
    assert result.code == 0 and "W&B" not in result.err
    assert build_spec(yaml.safe_load(load_documents(out)[0]["data"]["job.yaml"])).tracking.wandb is None
    result = cli("render", "k8s", quickstart, "tracking.wandb.project=mine", "--image", IMAGE, "--ephemeral-outputs",
                 "--out", out)
    assert result.code == 0 and "W&B" not in result.err
    assert build_spec(yaml.safe_load(load_documents(out)[0]["data"]["job.yaml"])).tracking.wandb.project == "mine"


def kubelet_mount(configmap: dict, pod: dict, mount: Path) -> None:
    """What the kubelet does with the pod's `job` volume: each listed key written to its path under the
    mount (a ConfigMap is flat; `items` rebuild folders), the manifest's JOB_MOUNT read as `mount`."""
    volume = next(v["configMap"] for v in pod["volumes"] if v["name"] == "job")
    values = {**configmap["data"], **{key: base64.b64decode(value) for key, value in configmap.get("binaryData", {}).items()}}
    assert sorted(item["key"] for item in volume["items"]) == sorted(values)  # with items, every key is listed
    for item in volume["items"]:
        target, value = mount / item["path"], values[item["key"]]
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            target.write_text(value.replace(JOB_MOUNT, str(mount)))
        else:
            target.write_bytes(value)


@needs_crds
def test_a_local_reward_package_travels_in_the_configmap_and_imports_in_the_pods(cli, make_job, tmp_path, monkeypatch):
    """A reward package of nested folders, rendered, mounted as the kubelet would, and the rendered entrypoint
    run from another folder with the containers' PYTHONPATH: the reward imports from the mount alone."""
    package = tmp_path / "project" / "k8s_rewards"
    (package / "scoring").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "scoring" / "__init__.py").write_text("from .lengths import short\n")
    (package / "scoring" / "lengths.py").write_text("def short(prompt, completion, reference):\n"
                                                    "    return -len(completion) / 8\n")
    (package / "scoring" / "table.bin").write_bytes(bytes(range(256)))  # not text: binaryData
    monkeypatch.chdir(package.parent)
    job = grpo_job(make_job, "k8s-reward", prompt_files(tmp_path), [{"function": "k8s_rewards.scoring:short"}],
                   training={"max_steps": 2})
    configmap, rayjob = render(cli, tmp_path, str(job), "--workers", "1", "--ephemeral-outputs", "--wandb-secret", "")
    for document in (configmap, rayjob):
        assert manifest_errors(document) == [], document["kind"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    head, worker = cluster["headGroupSpec"]["template"]["spec"], cluster["workerGroupSpecs"][0]["template"]["spec"]
    for pod in (head, worker):
        assert {"name": "PYTHONPATH", "value": JOB_MOUNT} in pod["containers"][0]["env"]
    mount = tmp_path / "mount"
    kubelet_mount(configmap, head, mount)
    assert sorted(p.relative_to(mount).as_posix() for p in (mount / "k8s_rewards").rglob("*") if p.is_file()) == [
        "k8s_rewards/__init__.py", "k8s_rewards/scoring/__init__.py", "k8s_rewards/scoring/lengths.py",
        "k8s_rewards/scoring/table.bin"]
    assert (mount / "k8s_rewards" / "scoring" / "table.bin").read_bytes() == bytes(range(256))

    command = rayjob["spec"]["entrypoint"].replace(JOB_MOUNT, str(mount)).split()
    assert command[:2] == ["ftcluster", "train"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "FTCLUSTER_CODE_PATH"}
    env["PYTHONPATH"] = str(mount)
    done = subprocess.run([sys.executable, "-m", "ftcluster", *command[1:], "--no-ray"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r for r in read_metrics(tmp_path / "runs" / "k8s-reward") if "reward/short" in r]

    (package / "scoring" / "big.txt").write_text("x" * 2**20)
    refused = cli("render", "k8s", str(job), "--image", IMAGE, "--workers", "1", "--ephemeral-outputs")
    assert refused.code == 2 and refused.err.count("\n") == 1, refused
    assert "code: your modules (k8s_rewards) and the job's files come to" in refused.err
    assert "build the code into the image" in refused.err
