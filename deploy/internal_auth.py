"""A deployment's secrets and how each role receives them.

- The internal token: every store and worker gRPC call must carry it. Random at each start of
  a deployment; only its own parts know it.
- The tenant secret: enters every tenant's namespace salt (router and store derive salts the
  same way). Given by the operator (KVMESH_TENANT_SECRET), or random and kept in the data
  directory (mode 0600) so that a restarted deployment finds its tenants' pages again.
- The router's API keys (key -> tenant).

They reach the child processes through their environment (KVMESH_<ROLE>_*), never argv: any
local user can read a process's argv (`ps`), only its owner its environment.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.deploy.errors import InvalidSecrets

TENANT_SECRET_ENV = "KVMESH_TENANT_SECRET"
TENANT_SECRET_FILE = "tenant_secret"


@dataclass(frozen=True)
class DeploymentSecrets:
    internal_token: str
    tenant_secret: str
    api_keys: Mapping[str, str] = field(default_factory=dict)  # key -> tenant

    def store_env(self, shared_tier: bool = False) -> dict[str, str]:
        """`shared_tier`: the store has a Redis tier, whose pages get a MAC under a key derived
        from the tenant secret (so a redeploy with the same secret still reads them)."""
        env = {"KVMESH_STORE_TOKEN": self.internal_token,
               "KVMESH_STORE_TENANT_SECRET": self.tenant_secret}
        if shared_tier:
            env["KVMESH_STORE_REDIS_MAC_KEY"] = hashlib.blake2b(
                self.tenant_secret.encode(), digest_size=32, person=b"kvmesh-redis-mac").hexdigest()
        return env

    def worker_env(self) -> dict[str, str]:
        return {"KVMESH_WORKER_TOKEN": self.internal_token,
                "KVMESH_WORKER_STORE_TOKEN": self.internal_token}

    def router_env(self) -> dict[str, str]:
        keys = ",".join(f"{key}={tenant}" for key, tenant in self.api_keys.items())
        return {"KVMESH_ROUTER_WORKER_TOKEN": self.internal_token,
                "KVMESH_ROUTER_SECRET": self.tenant_secret, "KVMESH_ROUTER_API_KEYS": keys}


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tenant_secret(data_dir: Path | None, environ: Mapping[str, str] = os.environ) -> str:
    """The operator's secret if given, else the one kept in `data_dir` (made on first use),
    else (no data directory) a random one for this run."""
    given = environ.get(TENANT_SECRET_ENV)
    if given:
        return given
    if data_dir is None:
        return new_token()
    path = data_dir / TENANT_SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        kept = path.read_text().strip()
        if not kept:
            raise InvalidSecrets(f"{path} is empty: delete it to make a new secret") from None
        return kept
    made = new_token()
    with os.fdopen(fd, "w") as out:
        out.write(made + "\n")
    return made


def read_api_key_file(path: str) -> list[str]:
    """One KEY or KEY=TENANT a line; blank lines and #-comments skipped."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InvalidSecrets(f"API key file {path!r}: {exc.strerror}") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
