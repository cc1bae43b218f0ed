"""The store's Prometheus endpoint: `GET /metrics` on a port of its own (`kvmesh store
--metrics-port N`), the per-tier counters of the Stats RPC in the text format.

Off unless a port is given (port 0 picks a free one). It binds 127.0.0.1 unless
`--metrics-host` says otherwise, and asks for `Authorization: Bearer TOKEN` whenever the store has
a token: KVMESH_STORE_METRICS_TOKEN (a scrape-only token, env only: argv is visible to every
local user), else the store's internal token. Off this host it needs one of the two: no port
of the deployment is open by default. It speaks TLS when the store does (same certificate)."""

from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.errors import InvalidConfig
from kvmesh.cachestore.store.tiered import TieredStore

ENV_PREFIX = "KVMESH_STORE_"
CLIENT_TIMEOUT_S = 10.0  # a scraper that sends its request slower than this is cut off
MAX_CONNECTIONS = 8  # scrapes served at once


@dataclass(frozen=True)
class StoreMetricsConfig:
    """Where the store serves /metrics. `port` None: not at all; 0 picks a free port."""

    port: int | None = None
    host: str = "127.0.0.1"
    token: str | None = field(default=None, repr=False)
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise InvalidConfig(f"metrics_port must be in [0, 65535], got {self.port}")
        if not self.host:
            raise InvalidConfig("metrics_host must not be empty")
        if self.port is not None and not self.token and not _is_loopback(self.host):
            raise InvalidConfig(
                f"metrics on {self.host} would be open to the network: set "
                f"{ENV_PREFIX}METRICS_TOKEN (or the store's token), or keep 127.0.0.1")

    @classmethod
    def from_sources(cls, flags: Mapping[str, object], store: StoreConfig,
                     env: Mapping[str, str] | None = None) -> StoreMetricsConfig:
        """Flags (None = not given) over KVMESH_STORE_METRICS_{PORT,HOST} over the defaults;
        the token from KVMESH_STORE_METRICS_TOKEN, else the store's; TLS as the store's."""
        env = os.environ if env is None else env
        port = flags.get("metrics_port")
        if port is None and (raw := env.get(ENV_PREFIX + "METRICS_PORT")) is not None:
            try:
                port = int(raw)
            except ValueError:
                raise InvalidConfig(f"{ENV_PREFIX}METRICS_PORT={raw!r} is not a port") from None
        host = flags.get("metrics_host") or env.get(ENV_PREFIX + "METRICS_HOST") or cls.host
        token = env.get(ENV_PREFIX + "METRICS_TOKEN") or store.token
        return cls(port=port if port is None else int(str(port)), host=str(host), token=token,
                   tls_cert=store.tls_cert, tls_key=store.tls_key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class TierCollector(Collector):
    """Each tier's TierStats at scrape time (the Stats RPC's numbers), labelled by tier."""

    def __init__(self, store: TieredStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        p = "kvmesh:store_"
        gauges = {"used_bytes": GaugeMetricFamily(p + "used_bytes", "Bytes held", labels=["tier"]),
                  "capacity_bytes": GaugeMetricFamily(p + "capacity_bytes", "Byte capacity",
                                                      labels=["tier"]),
                  "num_pages": GaugeMetricFamily(p + "pages", "Pages held", labels=["tier"]),
                  "is_available": GaugeMetricFamily(p + "tier_available",
                                                    "1 while the tier answers", labels=["tier"])}
        counters = {"hits": CounterMetricFamily(p + "hits", "Pages found", labels=["tier"]),
                    "misses": CounterMetricFamily(p + "misses", "Pages looked for, not found",
                                                  labels=["tier"]),
                    "evictions": CounterMetricFamily(p + "evictions", "Pages evicted",
                                                     labels=["tier"]),
                    "errors": CounterMetricFamily(p + "errors", "Failed calls (tier down) and "
                                                  "pages dropped as corrupt", labels=["tier"]),
                    "num_forged": CounterMetricFamily(p + "forged_pages", "Pages whose MAC "
                                                      "failed (also in errors)", labels=["tier"])}
        for tier in self._store.stats():
            for name, gauge in gauges.items():
                gauge.add_metric([tier.name], float(getattr(tier, name)))
            for name, counter in counters.items():
                counter.add_metric([tier.name], float(getattr(tier, name)))
        yield from gauges.values()
        yield from counters.values()


class _Handler(BaseHTTPRequestHandler):
    server: _MetricsServer
    timeout = CLIENT_TIMEOUT_S

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, b"only /metrics is served here\n", "text/plain")
        elif not self.server.is_authorized(self.headers.get("Authorization", "")):
            self._reply(401, b"send 'Authorization: Bearer TOKEN'\n", "text/plain")
        else:
            self._reply(200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass  # one line per scrape on stderr is noise


class _MetricsServer(ThreadingHTTPServer):
    """A thread per connection, at most MAX_CONNECTIONS at once (more are closed unanswered);
    the TLS handshake runs in the connection's thread, under its timeout."""

    daemon_threads = True

    def __init__(self, config: StoreMetricsConfig, store: TieredStore) -> None:
        super().__init__((config.host, config.port or 0), _Handler)
        self.registry = CollectorRegistry()
        self.registry.register(TierCollector(store))
        self._token = config.token.encode() if config.token else None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.tls: ssl.SSLContext | None = None
        if config.tls_cert and config.tls_key:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(config.tls_cert, config.tls_key)

    def is_authorized(self, header: str) -> bool:
        if self._token is None:
            return True
        scheme, _, value = header.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                                  self._token)

    def process_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        request.settimeout(CLIENT_TIMEOUT_S)
        if self.tls is not None:
            try:
                request = self.tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return  # a bad or slow handshake: nothing to answer
        super().finish_request(request, client_address)


class StoreMetricsServer:
    """/metrics for `store`, served from a daemon thread until `stop()`."""

    def __init__(self, config: StoreMetricsConfig, store: TieredStore) -> None:
        self._server = _MetricsServer(config, store)
        host, self.port = self._server.server_address[:2]
        self.host = host.decode() if isinstance(host, bytes) else host
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="kvmesh-store-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self._server.tls is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
