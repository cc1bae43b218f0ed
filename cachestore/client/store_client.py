"""StoreClient: the typed Python client of a KVStore server. Callers never see pb2 objects.

Two levels:
- tensors: `put(tokens, kv, namespace)` / `get_closest(tokens, namespace)` with kv shaped
  [num_layers, 2, num_tokens, num_kv_heads, head_dim] in the namespace's dtype;
- raw pages (what workers and RemoteTier move): `put_pages`, `get_closest_pages`, and the
  key-level `has_pages` / `get_pages` / `get_pages_leased` / `put_encoded_pages` /
  `put_pages_from` (pages encoded straight into a same-host server's slots) / `delete_pages`.
Tensor <-> page payload conversion costs one permute-copy each way; frames are written and read
by cachestore.wire without protobuf copies. Against a server on this host, key-level gets move
their bytes through shared-memory segments the client owns (cachestore/shm/client.py), or, for a
caller that checks pages itself, not at all: it reads them in the server's arenas (`mapped`);
those gets are page_gets.py's; key-level puts are copied straight into slots of the server's
shared arenas (cachestore/client/shm_puts.py). When the server offers it and nixl loads here,
key-level gets and puts move their bytes by NIXL instead (cachestore/client/dataplane.py;
`data_plane`), puts only when shared memory is off or declined.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import torch

from kvmesh.cachestore.client import kv_pages
from kvmesh.cachestore.client.breaker import CircuitBreaker
from kvmesh.cachestore.client.channel import open_channel
from kvmesh.cachestore.client.dataplane import DataPlaneCalls, copy_page_into
from kvmesh.cachestore.client.lookup import LookupCalls
from kvmesh.cachestore.client.page_gets import PageGets, chunks
from kvmesh.cachestore.client.shm_puts import SharedPuts
from kvmesh.cachestore.client.slot_fill import check_payload_pages
from kvmesh.cachestore.codec import encode_page
from kvmesh.cachestore.errors import (  # noqa: F401 - re-exported: callers import them from here
    InvalidRequest,
    PermissionDenied,
    ProtocolError,
    StoreError,
    StoreFull,
    StoreUnavailable,
    Unauthenticated,
)
from kvmesh.cachestore.keys import Namespace
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import typed_error
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.client import SegmentCallback, SegmentPool
from kvmesh.cachestore.shm.page_lease import PageLease
from kvmesh.cachestore.store.tiered import ClosestPages, LookupResult
from kvmesh.cachestore.tiers.base import TierStats
from kvmesh.v1 import store_pb2

_SERVICE = f"/{wire.SERVICE}/"
DATA_PLANE_ENV = "KVMESH_STORE_DATA_PLANE"
DataPlane = Literal["auto", "nixl", "grpc"]


@dataclass(frozen=True)
class ClosestKV:
    num_tokens: int  # matched tokens, a multiple of page_size
    kv: torch.Tensor  # [num_layers, 2, num_tokens, num_kv_heads, head_dim], namespace dtype, CPU
    tiers: list[str]  # tier each page came from


class StoreClient:
    """Thread-safe (one gRPC channel shared by all calls). `timeout` bounds every call.

    `shared_memory`: None = use /dev/shm for key-level gets (segments, mapped arenas) and puts
    (copies into the server's shared arenas, cachestore/client/shm_puts.py) when `target` is
    on this host (127.x, localhost, ::1, unix:), False = never, True = always ask (the server
    still declines unless the peer is local). `on_new_segment(address, nbytes)` runs once per
    new segment or mapped server arena (e.g. cudaHostRegister), `on_release_segment` before
    one is unmapped.
    `breaker`: skips a store that keeps timing out or cannot be reached, failing calls at once
    with StoreUnavailable for a while (cachestore/client/breaker.py); None turns that off.
    `data_plane` (default: env KVMESH_STORE_DATA_PLANE, else "auto"): how key-level gets (not
    `mapped` ones from a same-host server) and puts move bytes (the segment hooks also run for
    its registered receive buffers): "auto" = NIXL when the server offers it and nixl loads
    here, else gRPC frames; "nixl" = NIXL or StoreUnavailable; "grpc" = frames only.
    `lookup_socket`: `lookup` over the server's lookup socket when it offers one (plaintext
    channels only; cachestore/client/lookup.py), else gRPC Lookup; False: always gRPC Lookup."""

    def __init__(self, target: str, token: str | None = None, tls: bool | str | bytes = False,
                 timeout: float | None = 60.0, shared_memory: bool | None = None,
                 on_new_segment: SegmentCallback | None = None,
                 on_release_segment: SegmentCallback | None = None,
                 breaker: CircuitBreaker | None | Literal["default"] = "default",
                 data_plane: DataPlane | None = None, lookup_socket: bool = True) -> None:
        self.target = target
        plane = data_plane or os.environ.get(DATA_PLANE_ENV) or "auto"
        if plane not in ("auto", "nixl", "grpc"):
            raise InvalidRequest(f"data_plane must be auto, nixl or grpc, not {plane!r}")
        self.timeout = timeout
        use_shm = segments.is_local_target(target) if shared_memory is None else shared_memory
        self._segments = SegmentPool(on_new_segment, on_release_segment) if use_shm else None
        self._channel = open_channel(target, tls)
        self.breaker = CircuitBreaker() if breaker == "default" else breaker
        channel = (self._channel if self.breaker is None
                   else grpc.intercept_channel(self._channel, self.breaker))
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        pb, ch = store_pb2, channel
        self._put = ch.stream_unary(_SERVICE + "Put", wire.make_serializer(pb.PutHeader),
                                    pb.PutResponse.FromString)
        self._get_closest = ch.unary_stream(_SERVICE + "GetClosest",
                                            pb.GetClosestRequest.SerializeToString,
                                            wire.make_deserializer(pb.GetClosestResponse))
        self._unary = {name: ch.unary_unary(_SERVICE + name, req.SerializeToString, resp.FromString)
                       for name, req, resp in (
                           ("Lookup", pb.LookupRequest, pb.LookupResponse),
                           ("Delete", pb.DeleteRequest, pb.DeleteResponse),
                           ("Stats", pb.StatsRequest, pb.StatsResponse),
                           ("HasPages", pb.PageKeys, pb.HasPagesResponse),
                           ("DeletePages", pb.PageKeys, pb.DeleteResponse),
                           ("LookupHello", pb.LookupHelloRequest, pb.LookupHelloResponse))}
        # the lookup socket sends the token as it is: only where the channel does too
        self._lookups = (LookupCalls(target, token, timeout, self._lookup_port, self.breaker)
                         if tls is False and lookup_socket else None)
        self._page_gets = PageGets(ch, self._segments, timeout, self._metadata)
        self._plane = (DataPlaneCalls(target, ch, self._page_gets, timeout, self._metadata,
                                      required=plane == "nixl", on_new_buffer=on_new_segment,
                                      on_release_buffer=on_release_segment)
                       if plane != "grpc" else None)
        # same-host puts copy into the server's shared arenas (tried before NIXL and frames)
        self._shm_puts = (SharedPuts(target, ch, self._segments.arenas, timeout, self._metadata)
                          if self._segments is not None else None)
        self._put_pages = ch.stream_unary(_SERVICE + "PutPages",
                                          wire.make_serializer(pb.PutPagesHeader),
                                          pb.PutPagesResponse.FromString)

    # -- tensors ------------------------------------------------------------------------------

    def put(self, tokens: Any, kv: torch.Tensor, namespace: Namespace) -> int:
        """Store every full page of `tokens`; kv: [num_layers, 2, len(tokens), num_kv_heads,
        head_dim] in namespace.dtype (any device). Returns pages newly stored."""
        token_bytes = kv_pages.token_bytes(tokens, namespace)
        payloads = kv_pages.kv_to_pages(kv, namespace, len(token_bytes) // 4)
        return self._put_payloads(namespace, token_bytes, payloads) if payloads else 0

    def get_closest(self, tokens: Any, namespace: Namespace) -> ClosestKV | None:
        """Longest stored contiguous prefix of `tokens` as a tensor, or None if page 0 is not
        stored."""
        got = self._fetch_closest(namespace, kv_pages.token_bytes(tokens, namespace))
        if got is None:
            return None
        header, frames = got
        pages = wire.split_pages(frames, [namespace.page_nbytes] * header.num_pages)
        return ClosestKV(header.num_tokens, kv_pages.pages_to_kv(pages, namespace),
                         [wire.tier_name(t) for t in header.tiers])

    # -- raw pages ----------------------------------------------------------------------------

    def put_pages(self, namespace: Namespace, token_ids: Any,
                  payloads: Sequence[bytes | memoryview]) -> int:
        """Store full pages given as payloads (page i = payload i, namespace.page_nbytes each,
        [L, 2, P, H, D] bytes). Returns pages newly stored."""
        token_bytes = kv_pages.token_bytes(token_ids, namespace)
        num_pages = len(token_bytes) // 4 // namespace.page_size
        if len(payloads) != num_pages:
            raise InvalidRequest(f"{num_pages} full pages need {num_pages} payloads, "
                                 f"got {len(payloads)}")
        views = [memoryview(p).cast("B") for p in payloads]
        bad = [i for i, v in enumerate(views) if v.nbytes != namespace.page_nbytes]
        if bad:
            raise InvalidRequest(f"payloads {bad[:8]} are not {namespace.page_nbytes} bytes")
        return self._put_payloads(namespace, token_bytes, views) if views else 0

    def get_closest_pages(self, namespace: Namespace, token_ids: Any) -> ClosestPages | None:
        """Like get_closest, as one payload view per page ([L, 2, P, H, D] bytes): read-only
        views into the received frames, no copy."""
        got = self._fetch_closest(namespace, kv_pages.token_bytes(token_ids, namespace))
        if got is None:
            return None
        header, frames = got
        pages = wire.split_pages(frames, [namespace.page_nbytes] * header.num_pages)
        return ClosestPages(header.num_tokens, pages, [wire.tier_name(t) for t in header.tiers])

    def lookup(self, tokens: Any, namespace: Namespace) -> LookupResult:
        """Matched tokens and each page's tier (metadata only), over the lookup socket when
        the server offers one (cachestore/client/lookup.py), else gRPC Lookup."""
        request = store_pb2.LookupRequest(namespace=_spec(namespace),
                                          token_ids=kv_pages.token_bytes(tokens, namespace))
        raw = self._lookups.call(request.SerializeToString()) if self._lookups else None
        reply = (store_pb2.LookupResponse.FromString(raw) if raw is not None
                 else self._call("Lookup", request))
        return LookupResult(reply.num_tokens, [wire.tier_name(t) for t in reply.tiers])

    def delete(self, tokens: Any, namespace: Namespace,
               page_indices: Sequence[int] | None = None) -> int:
        """Delete the given pages of `tokens` (default: every full page); returns how many
        were stored."""
        if page_indices is not None and not page_indices:
            return 0
        reply = self._call("Delete", store_pb2.DeleteRequest(
            namespace=_spec(namespace),
            token_ids=kv_pages.token_bytes(tokens, namespace), page_indices=page_indices or []))
        return reply.num_pages_deleted

    def stats(self) -> list[TierStats]:
        reply = self._call("Stats", store_pb2.StatsRequest())
        return [wire.stats_from_proto(s) for s in reply.tiers]

    # -- key-level pages (RemoteTier) ---------------------------------------------------------

    def has_pages(self, keys: Sequence[bytes]) -> list[bool]:
        out: list[bool] = []
        for chunk in chunks(keys):
            out += self._call("HasPages", store_pb2.PageKeys(keys=chunk)).is_present
        return out

    def get_pages(self, keys: Sequence[bytes],
                  prefix_only: bool = False) -> list[memoryview | None]:
        """Encoded pages by key (None where absent), in buffers of their own. `prefix_only`:
        pages after the first missing one are not read and come back None."""
        with self.get_pages_leased(keys, prefix_only) as lease:
            # pages in memory the lease gives back (a segment, arenas, a registered buffer)
            borrowed = lease.is_shared_memory or lease.regions
            return segments.copy_out(lease.pages) if borrowed else lease.pages

    def get_pages_leased(self, keys: Sequence[bytes], prefix_only: bool = False,
                         mapped: bool = False) -> PageLease:
        """Like get_pages, as a PageLease: views straight into a shared-memory segment when the
        server is on this host (no copy), else into the received frames. Release it.

        `mapped`: the caller accepts views straight into the server's own page arenas (same
        host; no copy at all). Those pages are NOT checked by the server: the caller checks
        every page (cachestore.codec.check_page_header and the checksum) after reading it, and
        then `lease.is_valid()`, before using anything it read. Without shared memory (a
        remote server) that means NIXL pages the client does not check either."""
        in_place = mapped and self._segments is not None  # read in the server's own arenas
        if not in_place and keys and self._plane is not None and self._plane.is_on():
            lease = self._plane.try_get_leased(keys, prefix_only, is_checked_by_caller=mapped)
            if lease is not None:
                return lease
        return self._page_gets.get_leased(keys, prefix_only, mapped)

    @property
    def data_plane(self) -> str:
        """"nixl" when key-level bytes move by NIXL, else "grpc" (asks the server first)."""
        return "nixl" if self._plane is not None and self._plane.is_on() else "grpc"


    def reserve_segment(self, nbytes: int) -> None:
        """Make a shared-memory segment of `nbytes` for later gets now (a no-op without shared
        memory; without it, a NIXL receive buffer): a worker reserves one for its longest
        prefix at start."""
        if self._segments is not None:
            self._segments.reserve(nbytes)
        elif self._plane is not None:
            self._plane.reserve(nbytes)

    def put_encoded_pages(self, pages: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        """Store (key, encoded page) pairs; the server checks each page before storing any
        (of one call, or, through shared memory or NIXL, of one page size and batch). Pages
        go through the server's shared arenas when it is on this host (one copy), else by
        NIXL, else (and for what those could not take) by PutPages frames."""
        stored, arenas = 0, dict[str, int]()
        if pages and self._shm_puts is not None:
            stored, pages = self._shm_puts.try_put(pages, arenas)  # the rest go another way
        return stored + self._put_elsewhere(pages, arenas)

    def register_memory(self, tensor: torch.Tensor) -> bool:
        """Register a contiguous tensor (e.g. a worker's KV cache, on the host or a GPU) with
        the NIXL data plane until close, so put_tensor_pages / get_pages_into within it
        register nothing per call; the caller keeps it allocated. False without the plane."""
        if self._plane is None or not self._plane.is_on():
            return False
        self._plane.register(tensor)
        return True

    def put_tensor_pages(self, pages: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """put_encoded_pages of pages held in contiguous uint8 tensors, host or GPU: over NIXL
        WRITTEN from their memory, with no copy (GPU memory: cuda_copy / cuda_ipc / GPUDirect,
        as UCX has them); without the plane, or for what it could not take, copied to the
        host and sent as put_encoded_pages sends them."""
        stored = 0
        if pages and self._plane is not None and self._plane.is_on():
            stored, pages = self._plane.try_put_tensors(pages)
        return stored + self.put_encoded_pages(
            [(key, tensor.cpu().numpy().data) for key, tensor in pages])

    def get_pages_into(self, keys: Sequence[bytes], destinations: Sequence[torch.Tensor],
                       prefix_only: bool = False) -> list[bool]:
        """Pages by key straight into the caller's contiguous tensors (destinations[i],
        at least the page's size, all on one device: host or GPU), over NIXL with no copy;
        per key, whether it was found. Pages READ over NIXL are NOT checked: the caller checks
        each (cachestore.codec.check_page_header and the checksum) before use and reports bad
        ones with report_bad_pages. Without the plane (or when its transfer fails), pages
        come as get_pages_leased gives them, checked, and are copied in."""
        if keys and self._plane is not None and self._plane.is_on():
            try:
                return self._plane.get_into(keys, destinations, prefix_only)
            except StoreError:
                raise
            except OSError as exc:
                self._plane.failed(exc)
        with self.get_pages_leased(keys, prefix_only) as lease:
            for page, tensor in zip(lease.pages, destinations, strict=True):
                if page is not None:
                    copy_page_into(tensor, page)
            return [page is not None for page in lease.pages]

    def report_bad_pages(self, keys: Sequence[bytes]) -> None:
        """Pages get_pages_into read that failed the caller's check: the server drops them."""
        if self._plane is not None:
            self._plane.report_bad(keys)
        else:
            self._page_gets.end_lease(None, keys)

    def put_pages_from(self, namespace: Namespace,
                       pages: Sequence[tuple[bytes, bytes, memoryview]]) -> int:
        """Store pages of `namespace` given as (key, token ids as little-endian int32 bytes,
        payload [L, 2, P, H, D] bytes), without encoding them first: through a same-host
        server's shared arenas each payload is copied once, straight into its slot, and its
        header written there (the server checks every page as for put_encoded_pages); else
        (and for what those could not take) they are encoded and go as put_encoded_pages
        sends them. The payloads must not change during the call. Returns pages newly
        stored; raises InvalidRequest for a page of the wrong size."""
        check_payload_pages(namespace, pages)
        stored, sent, arenas = 0, 0, dict[str, int]()
        if pages and self._shm_puts is not None:
            stored, sent = self._shm_puts.try_put_from(namespace, pages, arenas)
        rest = [(key, encode_page(namespace, key, token_ids, payload))
                for key, token_ids, payload in pages[sent:]]
        return stored + self._put_elsewhere(rest, arenas)

    def _put_elsewhere(self, pages: Sequence[tuple[bytes, bytes | memoryview]],
                       arenas: dict[str, int]) -> int:
        """Put encoded pages by NIXL, else by PutPages frames, and map the same-host arenas
        they (and those in `arenas` already) landed in: pages newly stored."""
        stored = 0
        if pages and self._plane is not None and self._plane.is_on():
            stored, pages = self._plane.try_put(pages, arenas)  # the rest go as frames
        for chunk in chunks(pages):
            views = [memoryview(blob).cast("B") for _, blob in chunk]
            header = store_pb2.PutPagesHeader(keys=[key for key, _ in chunk],
                                              page_nbytes=[v.nbytes for v in views])
            reply = self._stream_in(self._put_pages, header, views)
            stored += reply.num_pages_stored
            arenas.update(zip(reply.arena_names, reply.arena_nbytes, strict=False))
        # where the pages landed in a same-host server: mapped (and page-locked, by
        # on_new_segment) now, off the path of the first get that reads them in place
        if arenas and self._segments is not None and self._segments.on_new_segment is not None:
            self._segments.arenas.prepare(arenas)
        return stored

    def delete_pages(self, keys: Sequence[bytes]) -> int:
        return sum(self._call("DeletePages", store_pb2.PageKeys(keys=chunk)).num_pages_deleted
                   for chunk in chunks(keys))

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; unmap and unlink this client's shared-memory segments."""
        if self._plane is not None:
            self._plane.close()
        if self._lookups is not None:
            self._lookups.close()
        self._channel.close()
        if self._segments is not None:
            self._segments.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lookup_port(self) -> int:
        return self._call("LookupHello", store_pb2.LookupHelloRequest()).port

    def _call(self, name: str, request: Any) -> Any:
        try:
            return self._unary[name](request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise typed_error(exc) from None

    def _stream_in(self, method: Any, header: Any, views: Sequence[memoryview]) -> Any:
        def items() -> Iterator:
            yield header
            yield from wire.cut_frames(views)

        try:
            return method(items(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise typed_error(exc) from None

    def _put_payloads(self, ns: Namespace, token_bytes: bytes,
                      views: Sequence[memoryview]) -> int:
        header = store_pb2.PutHeader(namespace=_spec(ns), token_ids=token_bytes,
                                     payload_nbytes=sum(v.nbytes for v in views))
        return self._stream_in(self._put, header, views).num_pages_stored

    def _fetch_closest(self, ns: Namespace, token_bytes: bytes
                       ) -> tuple[Any, list[memoryview]] | None:
        """(header, data frames of the matched pages' payloads) or None when nothing matched."""
        request = store_pb2.GetClosestRequest(namespace=_spec(ns),
                                              token_ids=token_bytes)
        try:
            stream = self._get_closest(request, timeout=self.timeout, metadata=self._metadata)
            header = next(stream, None)
            if not isinstance(header, store_pb2.GetClosestHeader):
                raise ProtocolError(f"GetClosest reply starts with {header!r}, not a header")
            if header.num_pages == 0:
                return None
            if (header.page_nbytes != ns.page_nbytes
                    or header.num_tokens != header.num_pages * ns.page_size):
                raise ProtocolError(f"GetClosest header does not fit the namespace: {header}")
            frames = wire.receive_frames(stream, header.num_pages * ns.page_nbytes,
                                         "GetClosest")
        except grpc.RpcError as exc:
            raise typed_error(exc) from None
        return header, frames


def _spec(ns: Namespace) -> Any:
    kv_pages.check_namespace(ns)
    return wire.namespace_to_spec(ns)
