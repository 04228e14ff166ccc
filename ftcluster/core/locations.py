"""What a data location names, told from its text: a storage URI, a Hugging Face hub dataset, a
glob, or a path of this machine (for the spec's checks, which run before any data is read)."""

from __future__ import annotations

import glob
from fnmatch import fnmatch
from pathlib import Path

from ftcluster.core.storage import is_uri

HUB_PREFIX = "hf:"
GLOB_CHARACTERS = frozenset("*?[")
# Files that look like credentials: never uploaded, even when a spec names them as data or they lie in
# a code folder that travels.
SECRET_PATTERNS = (".env", "*.env", ".netrc", "*.pem", "*.key", "id_rsa*", "id_ed25519*", "credentials*",
                   "*.p12", "auth_token", ".git-credentials")


def looks_secret(path: Path) -> bool:
    return any(fnmatch(path.name, pattern) for pattern in SECRET_PATTERNS)


def is_remote(location: str) -> bool:
    """A storage URI or a hub dataset: not a path of this machine."""
    return is_uri(location) or location.startswith(HUB_PREFIX)


def is_glob(location: str) -> bool:
    return bool(GLOB_CHARACTERS & set(location))


def exists(location: str) -> bool:
    """Whether a local data location names something (URIs and hub ids are checked when read)."""
    if is_remote(location):
        return True
    if is_glob(location):
        return bool(glob.glob(location, recursive=True))
    return Path(location).exists()
