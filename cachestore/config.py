"""StoreConfig: everything a store server needs, filled from CLI flags and KVMESH_STORE_* env vars
in one place (`StoreConfig.from_sources`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kvmesh.cachestore.errors import InvalidConfig

ENV_PREFIX = "KVMESH_STORE_"
DEFAULT_CPU_BYTES = 4 << 30
DATA_PLANES = ("auto", "nixl", "grpc")


@dataclass(frozen=True)
class StoreConfig:
    """One store server. Tiers in chain order: cpu (always), then disk, redis, remote if set.

    port 0 picks a free port. `token` is the deployment's internal bearer token (every call,
    every namespace); `token_file` lists client tokens, each bound to one tenant, read-only or
    read-write (cachestore.access), whose salts derive from `tenant_secret` (the router's
    secret). Secrets come from KVMESH_STORE_* env vars or files, not argv. `tls_cert` +
    `tls_key` (PEM paths) enable TLS. `disk_bytes` / `redis_ttl` / `cpu_bytes` are bytes / seconds.
    `shared_memory` lets clients on this host receive GetPages through /dev/shm segments, and
    keeps the cpu tier's pages in /dev/shm arenas they may map (`lease_s`: how long a mapped
    reply's pages stay unchanged unless released first).
    `data_plane` ("auto", "nixl", "grpc"; env KVMESH_STORE_DATA_PLANE, which StoreClient reads
    too): NIXL one-sided transfers into the cpu tier's registered arenas (cachestore/dataplane/)
    besides the gRPC frames; its leases and reservations last `lease_s`.
    `redis_mac_key` / `disk_mac_key` (env only, KVMESH_STORE_REDIS_MAC_KEY / _DISK_MAC_KEY) or
    the `*_mac_key_file` paths hold the deployment secret (>= 16 bytes) that seals that tier's
    pages with a MAC (cachestore.page_mac), so pages written there by anyone else are misses.
    Set it for a Redis shared between tenants or services (without it the store warns at start)
    and for a disk others can write.
    """

    host: str = "127.0.0.1"
    port: int = 0
    cpu_bytes: int = DEFAULT_CPU_BYTES
    disk_dir: str | None = None
    disk_bytes: int = 64 << 30
    redis_url: str | None = None
    redis_ttl: int | None = None
    remote: str | None = None  # host:port of another store server, the last tier
    remote_token: str | None = None
    remote_tls_ca: str | None = None  # PEM CA of --remote's certificate: talk TLS to it
    token: str | None = None
    token_file: str | None = None  # JSON client tokens (cachestore.access)
    tenant_secret: str | None = None  # derives client tokens' tenant salts; env only
    tls_cert: str | None = None
    tls_key: str | None = None
    redis_mac_key: str | None = field(default=None, repr=False)  # secret: env only
    redis_mac_key_file: str | None = None
    disk_mac_key: str | None = field(default=None, repr=False)  # secret: env only
    disk_mac_key_file: str | None = None
    max_workers: int = 32
    # bulk streams (Put, PutPages, GetClosest, GetPages) running at once; more are refused
    # (RESOURCE_EXHAUSTED), so unary control calls keep threads. None: 3/4 of max_workers
    max_bulk_streams: int | None = None
    stream_idle_s: float = 10.0  # a bulk stream waiting this long on its client is cancelled
    shared_memory: bool = True  # same-host GetPages may write into client /dev/shm segments
    lease_s: float = 30.0  # mapped GetPages: pages stay unchanged this long unless released
    # bulk page bytes: "auto" = NIXL (cachestore/dataplane/) when nixl imports, else gRPC
    # frames only; "nixl" = NIXL or fail to start; "grpc" = frames only. Leases and
    # reservations of the data plane last lease_s.
    data_plane: str = "auto"
    # SIGTERM/SIGINT: seconds spent copying the cpu tier down (disk/redis/remote) before exit;
    # 0: none. Kept under a typical kill timeout (Kubernetes waits 30 s, then SIGKILL)
    flush_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.host:
            raise InvalidConfig("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise InvalidConfig(f"port must be in [0, 65535], got {self.port}")
        if self.cpu_bytes <= 0:
            raise InvalidConfig(f"cpu_bytes must be positive, got {self.cpu_bytes}")
        if not 0 <= self.flush_s <= 3600:
            raise InvalidConfig(f"flush_s must be in [0, 3600] seconds, got {self.flush_s}")
        if not 0 < self.lease_s <= 3600:
            raise InvalidConfig(f"lease_s must be in (0, 3600] seconds, got {self.lease_s}")
        if self.data_plane not in DATA_PLANES:
            raise InvalidConfig(f"data_plane must be one of {DATA_PLANES}, "
                                f"got {self.data_plane!r}")
        if self.disk_bytes <= 0:
            raise InvalidConfig(f"disk_bytes must be positive, got {self.disk_bytes}")
        if self.redis_ttl is not None and self.redis_ttl <= 0:
            raise InvalidConfig(f"redis_ttl must be positive seconds, got {self.redis_ttl}")
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://", "redis+cluster://")
        ):
            raise InvalidConfig(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        if self.remote is not None and ":" not in self.remote:
            raise InvalidConfig(f"remote must be HOST:PORT, got {self.remote!r}")
        if self.token is not None and not self.token:
            raise InvalidConfig("token must not be empty (omit it to disable auth)")
        if self.token_file is not None and not self.tenant_secret:
            raise InvalidConfig("token_file needs the tenant secret: set "
                                "KVMESH_STORE_TENANT_SECRET (the router's secret)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise InvalidConfig("tls_cert and tls_key go together")
        if self.remote_tls_ca is not None and self.remote is None:
            raise InvalidConfig("remote_tls_ca needs remote")
        for tier in ("redis", "disk"):
            key, key_file = getattr(self, f"{tier}_mac_key"), getattr(self, f"{tier}_mac_key_file")
            if key is not None and key_file is not None:
                raise InvalidConfig(f"give {tier}_mac_key or {tier}_mac_key_file, not both")
            if key is not None and len(key.encode()) < 16:
                raise InvalidConfig(f"{tier}_mac_key must be at least 16 bytes")
        for name in ("tls_cert", "tls_key", "remote_tls_ca", "token_file", "redis_mac_key_file",
                     "disk_mac_key_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise InvalidConfig(f"{name} {path!r} is not a file")
        if self.max_workers < 2:
            raise InvalidConfig(f"max_workers must be at least 2 (bulk streams and control "
                                f"calls need threads of their own), got {self.max_workers}")
        if self.max_bulk_streams is not None and not 0 < self.max_bulk_streams < self.max_workers:
            raise InvalidConfig(f"max_bulk_streams must be in [1, max_workers={self.max_workers})"
                                f" (control calls need threads), got {self.max_bulk_streams}")
        if not 0 < self.stream_idle_s <= 3600:
            raise InvalidConfig(f"stream_idle_s must be in (0, 3600] seconds, "
                                f"got {self.stream_idle_s}")

    @property
    def bulk_streams(self) -> int:
        """Bulk streams that may run at once: max_bulk_streams, else 3/4 of max_workers."""
        if self.max_bulk_streams is not None:
            return self.max_bulk_streams
        return max(1, self.max_workers * 3 // 4)

    @property
    def is_tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_sources(
        cls, flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> StoreConfig:
        """Flags (None = not given) override KVMESH_STORE_<FIELD> env vars, which override the
        defaults. Env values are parsed to the field's type."""
        flags = flags or {}
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            if flags.get(f.name) is not None:
                values[f.name] = flags[f.name]
            elif (raw := env.get(ENV_PREFIX + f.name.upper())) is not None:
                values[f.name] = _parse_env(f.name, f.type, raw)
        return cls(**values)


_BOOLS = dict.fromkeys(("1", "true", "yes", "on"), True) | dict.fromkeys(
    ("0", "false", "no", "off"), False
)


def _parse_env(name: str, type_name: Any, raw: str) -> Any:
    if "bool" in str(type_name):
        if raw.strip().lower() not in _BOOLS:
            raise InvalidConfig(f"{ENV_PREFIX}{name.upper()}={raw!r} is not 1/0/true/false")
        return _BOOLS[raw.strip().lower()]
    if "int" in str(type_name):
        try:
            return parse_bytes(raw)
        except ValueError:
            raise InvalidConfig(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer") from None
    if "float" in str(type_name):
        try:
            return float(raw)
        except ValueError:
            raise InvalidConfig(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number") from None
    return raw


_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4096', '512M', '4G', '1.5g', '64KiB' -> bytes. Raises ValueError."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = 1
    if value and value[-1] in _UNITS:
        scale = _UNITS[value[-1]]
        value = value[:-1]
    number = float(value) if "." in value else int(value)
    return int(number * scale)
