"""The folder `ftcluster submit` uploads: the job spec (data paths rewritten), its local data files
and the tune space — built from exactly those files, so nothing else (``.git``, ``.venv``, keys)
can travel with it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

from ftcluster.config.spec import JobSpec, dump_spec
from ftcluster.core.errors import FtError
from ftcluster.core.locations import is_remote
from ftcluster.data.sources import Source
from ftcluster.models.load import ALIASES

JOB_FILE = "job.yaml"
SPACE_FILE = "space.yaml"
DATA_DIR = "data"
# Files that look like credentials are refused even when a spec names them as data.
SECRET_PATTERNS = (".env", "*.env", ".netrc", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "credentials*",
                   "*.p12", "auth_token", ".git-credentials")


@dataclass
class Package:
    folder: Path
    spec: JobSpec  # as it will run on the cluster (relative data paths)
    spec_sha256: str  # of the spec and every uploaded byte: names the exact job
    size_bytes: int
    notes: list[str]


def looks_secret(path: Path) -> bool:
    return any(fnmatch(path.name, pattern) for pattern in SECRET_PATTERNS)


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


def build_package(spec: JobSpec, folder: Path, space: Path | None, max_upload_mb: float) -> Package:
    """Copy the spec's local data (and the space) into `folder`; refuse secrets and oversize uploads."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATA_DIR).mkdir(exist_ok=True)
    notes: list[str] = []
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
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    if size > max_upload_mb * 2**20:
        biggest = max(files, key=lambda p: p.stat().st_size)
        raise FtError(f"upload: {size / 2**20:.1f} MB is over the {max_upload_mb:g} MB limit (largest: "
                      f"{biggest.name}, {biggest.stat().st_size / 2**20:.1f} MB); put the data on shared storage the "
                      "cluster mounts (NFS, a PVC) and point data.train at it, or raise --max-upload-mb")
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return Package(folder, cluster_spec, digest.hexdigest(), size, notes)
