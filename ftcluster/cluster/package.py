"""The folder `ftcluster submit` uploads: the job spec (data paths rewritten), its local data files,
the tune space and the user's own modules the spec names (a reward's my_rewards.py, at the root: Ray
puts the working directory on the Python path of the job and its workers) — built from exactly those
files, so nothing else (``.git``, ``.venv``, keys) can travel with it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftcluster.cluster.user_code import LocalModule, find_user_code
from ftcluster.config.spec import JobSpec, dump_spec
from ftcluster.core.errors import FtError
from ftcluster.core.locations import is_remote, looks_secret
from ftcluster.data.sources import Source
from ftcluster.models.load import ALIASES

JOB_FILE = "job.yaml"
SPACE_FILE = "space.yaml"
DATA_DIR = "data"


@dataclass
class Package:
    folder: Path
    spec: JobSpec  # as it will run on the cluster (relative data paths)
    spec_sha256: str  # of the spec and every uploaded byte: names the exact job
    size_bytes: int
    notes: list[str]


def _copy_data(location: str, target: Path, key: str) -> list[Path]:
    """A data file (to ``target``), or a folder of shards, a glob's files or a save_to_disk folder
    (into the folder ``target``); a file that looks like a credential, or a link inside a folder that
    leads out of it (a shard linked to ~/.aws/credentials), is refused."""
    source, data = Path(location), Source(location)
    if source.is_file():
        copies, files = [target], [source]
    elif data.is_files():  # a folder of shards, or a glob
        files = [shard.path for shard in data.shards()]
        copies = [target / (file.relative_to(source) if source.is_dir() else file.name) for file in files]
    else:  # a `datasets` folder: all of it
        files = [p for p in source.rglob("*") if p.is_file()]
        copies = [target / file.relative_to(source) for file in files]
    for file in files:
        if looks_secret(file) or looks_secret(file.resolve()):
            raise FtError(f"data.{key}: {file.name} looks like a credentials file; it is never uploaded")
        if source.is_dir() and not file.resolve().is_relative_to(source.resolve()):
            raise FtError(f"data.{key}: {file} is a link to {file.resolve()}, outside {source}; links that leave the "
                          "data folder are never uploaded (copy the file into the folder if it belongs there)")
    for file, copy in zip(files, copies):
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, copy)
    return copies


def _copy_code(module: LocalModule, folder: Path) -> str:
    """Copy a local module to the package's root; what it is, for the user."""
    if module.entry in (JOB_FILE, SPACE_FILE, DATA_DIR):
        raise FtError(f"{module.key}: the package {module.entry}/ has the name of the upload's own {module.entry}/ "
                      "folder; rename the package")
    files = module.files()
    for file, shipped in files:
        (folder / shipped).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, folder / shipped)
    return f"{module.name} ({module.entry})" if module.source.is_file() else f"{module.name} ({len(files)} files)"


def _check_size(folder: Path, files: list[Path], max_upload_mb: float) -> int:
    size = sum(p.stat().st_size for p in files)
    if size > max_upload_mb * 2**20:
        biggest = max(files, key=lambda p: p.stat().st_size)
        fix = ("put the data on shared storage the cluster mounts (NFS, a PVC) and point data.train at it"
               if biggest.relative_to(folder).parts[0] == DATA_DIR else
               "install big code in the cluster's image (and here, so it is not shipped)")
        raise FtError(f"upload: {size / 2**20:.1f} MB is over the {max_upload_mb:g} MB limit (largest: "
                      f"{biggest.name}, {biggest.stat().st_size / 2**20:.1f} MB); {fix}, or raise --max-upload-mb")
    return size


def build_package(spec: JobSpec, folder: Path, space: Path | None, max_upload_mb: float) -> Package:
    """Copy the spec's local data, the space and the user's modules into `folder`; refuse secrets and
    oversize uploads."""
    code = find_user_code(spec)  # first: a module that cannot be found is refused before anything is copied
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATA_DIR).mkdir(exist_ok=True)
    notes: list[str] = list(code.notes)
    data_update = {}
    sources = []
    for key in ("train", "validation"):
        value = getattr(spec.data, key)
        if not value:
            continue
        if is_remote(value):
            continue  # read where it is: object storage or the hub
        target = Path(DATA_DIR) / f"{key}-{Path(value).name.replace('*', '_')}"
        data_update[key] = str(target)
        sources += _copy_data(value, folder / target, key)
    cluster_spec = spec.model_copy(update={"data": spec.data.model_copy(update=data_update)})
    model_path = Path(spec.model.path).expanduser()
    if spec.model.path not in ALIASES and model_path.exists():
        notes.append(f"model.path {spec.model.path} is a local path: it is not uploaded, and must exist at that path "
                     "on the cluster's nodes (shared storage or the image)")
    (folder / JOB_FILE).write_text(dump_spec(cluster_spec))
    if space is not None:
        shutil.copyfile(space, folder / SPACE_FILE)
    shipped = [_copy_code(module, folder) for module in code.local]
    if shipped:
        notes.append(f"code: {', '.join(shipped)} shipped with the job (imported on the cluster from its working "
                     "directory)")
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = _check_size(folder, files, max_upload_mb)
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return Package(folder, cluster_spec, digest.hexdigest(), size, notes)
