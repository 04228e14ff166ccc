"""A signature over Ray Tune's saved state, checked before `tune --resume` loads it.

Ray Tune saves a sweep's state with pickle (the tuner, the searcher, each trial's parameters), and
`Tuner.restore` unpickles it: whoever can write to the sweep's folder or bucket could run code on the
machine that resumes it. So when a sweep launch ends, this machine signs every file of the state
(SHA-256 of each, HMAC-SHA256 of the list with a key kept in this user's configuration folder, never
in the store), and `--resume` refuses, in one line, state whose files or signature differ. Resuming
on another machine needs the same key file there, or `--trust-state`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from ftcluster.core.errors import FtError
from ftcluster.core.storage import is_uri

SIGNATURE = "tune-signature.json"  # beside the sweep's tune/ folder (Tune owns that one)
KEY_FILE_ENV = "FTCLUSTER_STATE_KEY"
SAFE_SUFFIXES = (".safetensors",)  # loaded without running code: not worth reading back to hash


def key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or "~/.config/ftcluster/state.key").expanduser()


def signing_key() -> bytes:
    """This user's key (made on first use, readable by the user alone)."""
    path = key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _state_files(state_dir: str) -> dict[str, str]:
    """SHA-256 of every file below the state folder (a path or a storage URI), by relative name."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(state_dir) if is_uri(state_dir) else (pafs.LocalFileSystem(), state_dir)
    digests = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True)):
        name = info.path[len(root):].lstrip("/")
        if info.type != pafs.FileType.File or name.endswith(SAFE_SUFFIXES):
            continue
        digest = hashlib.sha256()
        with fs.open_input_stream(info.path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    return dict(sorted(digests.items()))


def _mac(files: dict[str, str]) -> str:
    return hmac.new(signing_key(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def sign_state(state_dir: str) -> str:
    """The signature document of the state folder as it is now (written beside it by the caller)."""
    files = _state_files(state_dir)
    return json.dumps({"files": files, "hmac": _mac(files)}, indent=1)


def check_state(state_dir: str, signature: str | None) -> None:
    """Refuse, in one line, state this machine did not sign or that changed since."""
    advice = (f"resume on the machine that ran the sweep, copy its key file ({key_file()}) here, or pass "
              "--trust-state if you trust everyone who can write there")
    if signature is None:
        raise FtError(f"{state_dir}: Ray Tune's saved state (pickles, which run code when loaded) carries no "
                      f"signature ({SIGNATURE}): the sweep ended without signing it, or it was made elsewhere; {advice}")
    try:
        signed = json.loads(signature)
        files, mac = signed["files"], signed["hmac"]
    except (ValueError, KeyError, TypeError):
        raise FtError(f"{state_dir}: {SIGNATURE} is damaged; {advice}") from None
    if not hmac.compare_digest(_mac(files), str(mac)):
        raise FtError(f"{state_dir}: {SIGNATURE} was not made with this machine's key; {advice}")
    now = _state_files(state_dir)
    changed = sorted(name for name in files.keys() | now.keys() if files.get(name) != now.get(name))
    if changed:
        raise FtError(f"{state_dir}: Ray Tune's saved state changed since the sweep signed it ({', '.join(changed[:3])}"
                      f"{' ...' if len(changed) > 3 else ''}); {advice}")
