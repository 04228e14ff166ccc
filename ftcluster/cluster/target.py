"""Which Ray cluster a command talks to, and how it authenticates.

The address comes from ``--address``, else a named profile (``--cluster NAME`` in
``~/.config/ftcluster/clusters.yaml``), else ``RAY_ADDRESS``. Ray 2.60 clusters use token
authentication: the token comes from ``RAY_AUTH_TOKEN``, the profile's ``token_file``, or Ray's own
``~/.ray/auth_token``. It is sent as a header and never printed.

    # ~/.config/ftcluster/clusters.yaml
    prod:
      address: http://ray-head.example.internal:8265
      token_file: ~/.ray/prod_token
      cluster_config: cluster/aws-gpu.yaml   # optional: an autoscaling cluster's `ray up` config
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftcluster.core.errors import FtError, first_line

PROFILES_ENV = "FTCLUSTER_CLUSTERS"  # another profiles file (tests, CI)
RAY_TOKEN_FILE = Path("~/.ray/auth_token")


def profiles_path() -> Path:
    return Path(os.environ.get(PROFILES_ENV, "~/.config/ftcluster/clusters.yaml")).expanduser()


@dataclass
class ClusterTarget:
    address: str  # the dashboard's HTTP address, e.g. http://127.0.0.1:8265
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # holds the token: never print
    cluster_config: Path | None = None  # its `ray up` config, for autoscaling limits
    _client: Any = field(default=None, init=False, repr=False, compare=False)

    def client(self):
        """One JobSubmissionClient per target (creating one is an HTTP round trip)."""
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        if self._client is not None:
            return self._client
        try:
            self._client = JobSubmissionClient(self.address, headers=dict(self.headers))
            return self._client
        except AuthenticationError:
            raise FtError(self.auth_failed()) from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise FtError(f"cluster {self.address}: cannot reach the Ray dashboard ({first_line(exc)})") from None

    def auth_failed(self, detail: str = "") -> str:
        token = "a token was sent" if self.headers else "no token was found"
        return (f"cluster {self.address}: authentication failed{detail} ({token}); set RAY_AUTH_TOKEN, the profile's "
                "token_file, or ~/.ray/auth_token to the cluster's token")

    def get(self, path: str) -> dict:
        """GET a dashboard API path (JSON), with the token."""
        import requests

        try:
            response = requests.get(self.address.rstrip("/") + path, headers=self.headers, timeout=30)
        except requests.RequestException as exc:
            raise FtError(f"cluster {self.address}: cannot reach the Ray dashboard ({first_line(exc)})") from None
        if response.status_code in (401, 403):
            raise FtError(self.auth_failed(f" (HTTP {response.status_code})"))
        response.raise_for_status()
        return response.json()


def _http(address: str) -> str:
    """Job submission talks HTTP to the dashboard; accept a bare host:port too."""
    if address.startswith(("http://", "https://")):
        return address
    if address.startswith("ray://"):
        raise FtError(f"address {address}: job submission needs the dashboard address (http://HEAD:8265), "
                      "not a Ray Client address")
    return f"http://{address}"


def load_profile(name: str) -> dict:
    path = profiles_path()
    if not path.is_file():
        raise FtError(f"--cluster {name}: no profiles file {path} (a mapping NAME: {{address: ..., token_file: ...}})")
    profiles = yaml.safe_load(path.read_text()) or {}
    if not isinstance(profiles, dict) or name not in profiles:
        known = ", ".join(profiles) if isinstance(profiles, dict) else ""
        raise FtError(f"{path}: no cluster profile {name!r}" + (f" (profiles: {known})" if known else ""))
    profile = profiles[name]
    if not isinstance(profile, dict) or "address" not in profile:
        raise FtError(f"{path}: {name}: needs an address, e.g. address: http://HEAD:8265")
    return profile


def resolve_target(address: str | None, cluster: str | None) -> ClusterTarget:
    profile = load_profile(cluster) if cluster else {}
    address = address or profile.get("address") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise FtError("no cluster address: pass --address http://HEAD:8265, --cluster NAME "
                      f"(profiles in {profiles_path()}), or set RAY_ADDRESS")
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and profile.get("token_file"):
        token_file = Path(profile["token_file"]).expanduser()
        if not token_file.is_file():
            raise FtError(f"{profiles_path()}: {cluster}: token_file {token_file} not found")
        token = token_file.read_text().strip()
    if not token and RAY_TOKEN_FILE.expanduser().is_file():
        token = RAY_TOKEN_FILE.expanduser().read_text().strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    config = profile.get("cluster_config")
    if config and not Path(config).expanduser().is_file():
        raise FtError(f"{profiles_path()}: {cluster}: cluster_config {config} not found")
    return ClusterTarget(_http(address), headers, Path(config).expanduser() if config else None)
