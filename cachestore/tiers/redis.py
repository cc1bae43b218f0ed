"""Redis tier: encoded pages as Redis string values, one key per page.

URL scheme picks the deployment:
- `redis://host:port/db`, `rediss://...` (TLS), `unix:///path.sock` -> a single server;
- `redis+cluster://host:port` or `rediss+cluster://...` -> Redis Cluster, with host:port any
  node used to discover the others (the same as passing `cluster=True` with a `redis://` URL).

Every batch is one pipeline round trip (per cluster node): EXISTS / GET (GETEX when a TTL is
set, so hits refresh it) / SET NX [EX ttl] / DEL per page. One SET per page is atomic, so a page
is visible only whole; SET NX makes re-putting a present page a no-op. Capacity and eviction are
Redis's own (`maxmemory`, `maxmemory-policy allkeys-lru`): `put_many` never reports evictions,
and `stats()` reports Redis's used_memory / maxmemory (0: unlimited) and DBSIZE as num_pages,
summed over cluster primaries (they count everything in the database, not only kvmesh pages).

Failures are fast: 0.5 s socket timeouts, no client-side retries, and after a failure the tier
answers TierUnavailable at once for `retry_after_s` (1.5 s) so a dead Redis adds no latency to
every request; the next call after that reconnects. Uses redis-py with the hiredis parser.

With `mac_key` every page is stored sealed (cachestore.page_mac: a 32-byte nonce + Poly1305
trailer) and opened on every get before it is returned: a page whose MAC fails (forged by
someone who can write Redis, or sealed with another key) is a miss, deleted from Redis and
counted in `num_forged` and `errors`. Without a key, anyone who can write Redis can forge a
page that passes its xxh3_64 checksum; the store server logs a warning at start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.connection import Connection, Encoder, PythonRespSerializer
from redis.exceptions import OutOfMemoryError, RedisClusterException
from redis.retry import Retry

from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.page_mac import PageMac
from kvmesh.cachestore.tiers.base import Page, Tier, TierFull, TierStats, TierUnavailable

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_SINGLE_SCHEMES = {"redis", "rediss", "unix"}
# RedisClusterException (cluster unreachable, slots not covered) is not a RedisError.
_BACKEND_ERRORS = (redis.RedisError, RedisClusterException, OSError)


def parse_url(url: str, cluster: bool | None = None) -> tuple[str, bool]:
    """(URL redis-py understands, whether it names a cluster)."""
    parts = urlsplit(url)
    if parts.scheme in _CLUSTER_SCHEMES:
        if cluster is False:
            raise InvalidConfig(f"{url!r} names a cluster but cluster=False")
        return urlunsplit(parts._replace(scheme=_CLUSTER_SCHEMES[parts.scheme])), True
    if parts.scheme not in _SINGLE_SCHEMES:
        raise InvalidConfig(f"redis URL scheme must be one of redis, rediss, unix, redis+cluster, "
                            f"rediss+cluster; got {url!r}")
    return url, bool(cluster)


class RedisTier(Tier):
    """Thread-safe (redis-py clients are). Backend errors raise TierUnavailable; a Redis that
    refuses writes for lack of memory (OOM with maxmemory-policy noeviction) raises TierFull.
    Errors that reach the caller are counted by the caller (TieredStore); `stats().errors`
    here counts only the ones swallowed (single refused writes, failed stats calls)."""

    name = "redis"

    def __init__(self, url: str, ttl_seconds: int | None = None, key_prefix: str = "kvmesh:",
                 cluster: bool | None = None, socket_timeout_s: float = 0.5,
                 retry_after_s: float = 1.5, mac_key: bytes | None = None) -> None:
        if ttl_seconds is not None and (not isinstance(ttl_seconds, int) or ttl_seconds <= 0):
            raise InvalidConfig(f"redis ttl_seconds must be a positive int or None, "
                                f"got {ttl_seconds!r}")
        self.url, self.is_cluster = parse_url(url, cluster)
        self.ttl_seconds = ttl_seconds
        self.key_prefix = key_prefix.encode()
        self.socket_timeout_s = socket_timeout_s
        self.retry_after_s = retry_after_s
        self._lock = threading.Lock()
        self._client: redis.Redis | RedisCluster | None = None
        self._down_until = 0.0
        self._stats = TierStats(name=self.name)
        self._mac = PageMac(mac_key) if mac_key is not None else None

    # -- Tier API ------------------------------------------------------------------------------

    def contains_many(self, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []
        return [bool(n) for n in self._pipeline(lambda p, k: p.exists(k), keys)]

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        if not keys:
            return []
        if self.ttl_seconds is None:
            blobs = self._pipeline(lambda p, k: p.get(k), keys)
        else:
            blobs = self._pipeline(lambda p, k: p.getex(k, ex=self.ttl_seconds), keys)
        forged: list[bytes] = []
        if self._mac is not None:
            for i, blob in enumerate(blobs):
                if blob is not None:
                    blobs[i] = self._mac.open(blob)
                    if blobs[i] is None:
                        forged.append(keys[i])
        num_hits = sum(blob is not None for blob in blobs)
        with self._lock:
            self._stats.hits += num_hits
            self._stats.misses += len(keys) - num_hits
            self._stats.num_forged += len(forged)
            self._stats.errors += len(forged)
        if forged:
            self._drop_forged(forged)
        return blobs

    def put_many(self, pages: Sequence[Page]) -> list[Page]:
        if not pages:
            return []
        if self._mac is not None:  # one copy per page: a SET takes the value as one buffer
            pages = [(key, b"".join((blob, self._mac.trailer(blob)))) for key, blob in pages]
        results = self._pipeline(
            lambda p, page: p.set(self.key_prefix + page[0], page[1], nx=True,
                                  ex=self.ttl_seconds),
            pages, prefixed=False, raise_on_error=False)
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            with self._lock:
                self._stats.errors += len(failures)
            if len(failures) == len(pages):
                if all(isinstance(f, OutOfMemoryError) for f in failures):
                    raise TierFull(f"redis refused every write: {failures[0]}")
                raise TierUnavailable(f"redis refused every write: {failures[0]}")
        return []  # Redis evicts by itself (maxmemory-policy); nothing to demote

    def delete_many(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        return sum(self._pipeline(lambda p, k: p.delete(k), keys))

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(self.name, 0, 0, 0, self._stats.hits, self._stats.misses, 0,
                          self._stats.errors, time.monotonic() >= self._down_until,
                          self._stats.num_forged)
        if not s.is_available:
            return s
        try:
            client = self._get_client()
            if self.is_cluster:
                infos = client.info("memory", target_nodes=RedisCluster.PRIMARIES)
                memory = list(infos.values()) if _is_per_node(infos) else [infos]
                s.num_pages = int(client.dbsize(target_nodes=RedisCluster.PRIMARIES))
            else:
                memory = [client.info("memory")]
                s.num_pages = int(client.dbsize())
        except _BACKEND_ERRORS as e:
            self._mark_down(e)
            with self._lock:
                self._stats.errors += 1
            s.is_available = False
            s.errors += 1
            return s
        s.used_bytes = sum(int(m.get("used_memory", 0)) for m in memory)
        s.capacity_bytes = sum(int(m.get("maxmemory", 0)) for m in memory)
        return s

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    # -- internals -----------------------------------------------------------------------------

    def _drop_forged(self, keys: list[bytes]) -> None:
        """Delete pages whose MAC failed; a Redis that fails now just keeps them until the next
        read drops them (they are never returned)."""
        try:
            self._pipeline(lambda p, k: p.delete(k), keys)
        except TierUnavailable:
            pass

    def _get_client(self) -> redis.Redis | RedisCluster:
        with self._lock:
            if self._client is not None:
                return self._client
        kwargs: dict = dict(socket_timeout=self.socket_timeout_s,
                            socket_connect_timeout=self.socket_timeout_s,
                            retry=Retry(NoBackoff(), 0))
        client: redis.Redis | RedisCluster
        if self.is_cluster:
            if urlsplit(self.url).scheme == "redis":  # TLS keeps redis-py's own SSL connection
                kwargs["connection_class"] = _NoCopyConnection
            client = RedisCluster.from_url(self.url, **kwargs)
        else:
            pool = redis.ConnectionPool.from_url(self.url, command_packer=_no_copy_packer(),
                                                 **kwargs)
            client = redis.Redis(connection_pool=pool)
        with self._lock:
            if self._client is None:
                self._client = client
                return client
        client.close()
        return self._client

    def _pipeline(self, add, items, prefixed: bool = True, raise_on_error: bool = True) -> list:
        """Queue add(pipe, item) for each item (item prefixed with key_prefix when it is a key)
        and run them in one round trip per node."""
        if time.monotonic() < self._down_until:
            raise TierUnavailable(f"redis at {self.url} failed recently; retrying after "
                                  f"{self.retry_after_s} s")
        try:
            pipe = self._get_client().pipeline(transaction=False)
            for item in items:
                add(pipe, self.key_prefix + item if prefixed else item)
            return pipe.execute(raise_on_error=raise_on_error)
        except OutOfMemoryError as e:
            raise TierFull(f"redis is out of memory: {e}") from e
        except redis.ResponseError as e:
            self._mark_down(e)
            raise TierUnavailable(f"redis at {self.url}: {e}") from e
        except _BACKEND_ERRORS as e:
            self._mark_down(e)
            raise TierUnavailable(f"redis at {self.url} unreachable: {e}") from e

    def _mark_down(self, error: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            client, self._client = self._client, None  # reconnect (and rediscover) next time
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken client must not mask the error
                pass


def _no_copy_packer() -> PythonRespSerializer:
    """redis-py's pure-Python command packer: it sends values over 6 kB as their own buffers,
    where the hiredis packer copies every page into one new command buffer (on 2 cores that
    copy made pipelined SET of 0.37 MB pages several times slower). Replies are still parsed
    by hiredis."""
    return PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)


class _NoCopyConnection(Connection):
    """A plain TCP connection using the no-copy packer (for cluster nodes, which accept a
    connection class but not a packer)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("command_packer", _no_copy_packer())
        super().__init__(**kwargs)


def _is_per_node(info: dict) -> bool:
    return bool(info) and all(isinstance(v, dict) for v in info.values())
