"""Key-level gets of a StoreClient (GetPages, ReleasePages), handed out as PageLeases.

Pages come inline in the reply's data frames, or, from a server on this host, written into one
of the client's shared-memory segments (cachestore/shm/client.py), or, for a caller that checks
pages itself, not moved at all: mapped, read in place in the server's own arenas under a lease
that a ReleasePages ends (sent without waiting for the answer).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from kvmesh.cachestore.errors import ProtocolError, StoreUnavailable
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import typed_error
from kvmesh.cachestore.shm import segments
from kvmesh.cachestore.shm.client import SegmentPool
from kvmesh.cachestore.shm.page_lease import PageLease, fits_mapped, fits_segment, pages_by_key
from kvmesh.v1 import store_pb2

MAX_KEYS_PER_CALL = 1 << 16
Metadata = tuple[tuple[str, str], ...] | None


class PageGets:
    """GetPages and ReleasePages on a client's channel; thread-safe. `segment_pool` is the
    client's (None: every get answers inline); the client closes it."""

    def __init__(self, channel: grpc.Channel, segment_pool: SegmentPool | None,
                 timeout: float | None, metadata: Metadata) -> None:
        self.segment_pool = segment_pool
        self.timeout, self._metadata = timeout, metadata
        pb, method = store_pb2, f"/{wire.SERVICE}/"
        self._get_pages = channel.unary_stream(method + "GetPages", pb.PageKeys.SerializeToString,
                                               wire.make_deserializer(pb.GetPagesResponse))
        self._release_pages = channel.unary_unary(method + "ReleasePages",
                                                  pb.ReleasePagesRequest.SerializeToString,
                                                  pb.ReleasePagesResponse.FromString)
        self._lock = threading.Lock()
        self._releasing: set[Any] = set()  # ReleasePages calls in flight

    def get_leased(self, keys: Sequence[bytes], prefix_only: bool = False,
                   mapped: bool = False) -> PageLease:
        """StoreClient.get_pages_leased: the caller releases the lease."""
        if self.segment_pool is not None and 0 < len(keys) <= MAX_KEYS_PER_CALL:
            lease = self.segment_pool.read(
                lambda chunk, segment, accept_mapped: self.fetch(
                    chunk, prefix_only, segment, accept_mapped),
                keys, self.end_lease if mapped else None)
        else:
            pages: list[memoryview | None] = []
            for chunk in chunks(keys):
                if prefix_only and None in pages:
                    pages += [None] * len(chunk)
                    continue
                header, inline = self.fetch(chunk, prefix_only, None)
                pages += pages_by_key(header.is_found, inline)
            lease = PageLease(pages)
        if prefix_only and None in lease.pages:  # an older server reads every key
            first = lease.pages.index(None)
            lease.pages[first:] = [None] * (len(lease.pages) - first)
        return lease

    def fetch(self, keys: Sequence[bytes], prefix_only: bool, segment: segments.Segment | None,
              accept_mapped: bool = False) -> tuple[Any, list[memoryview]]:
        """One GetPages call: (checked header, the found pages sent inline; none when they
        went to `segment`, it was too small, or they are mapped)."""
        request = store_pb2.PageKeys(keys=keys, prefix_only=prefix_only,
                                     accept_mapped=accept_mapped)
        if segment is not None:
            request.segment.name, request.segment.capacity = segment.name, segment.capacity
        try:
            stream = self._get_pages(request, timeout=self.timeout, metadata=self._metadata)
            header = next(stream, None)
            if (not isinstance(header, store_pb2.GetPagesHeader)
                    or len(header.is_found) != len(keys)
                    or sum(header.is_found) != len(header.page_nbytes)):
                raise ProtocolError(f"GetPages reply starts with {header!r}")
            if header.HasField("mapped"):
                if not accept_mapped or not fits_mapped(header):
                    raise ProtocolError(f"GetPages: unasked or malformed mapped reply {header!r}")
            is_shared = header.is_shared_memory or header.segment_nbytes_needed
            if is_shared and (segment is None or not fits_segment(header, segment.capacity)):
                raise ProtocolError(f"GetPages: shared-memory reply {header!r} does not fit "
                                    f"the segment {segment and segment.name}")
            is_shared = is_shared or header.HasField("mapped")
            frames = wire.receive_frames(stream, 0 if is_shared else sum(header.page_nbytes),
                                         "GetPages")
        except grpc.RpcError as exc:
            raise typed_error(exc) from None
        return header, [] if is_shared else wire.split_pages(frames, header.page_nbytes)

    def end_lease(self, lease_id: int | None, bad_keys: Sequence[bytes] = ()) -> None:
        """Tell the server a mapped get's pages are read (and which failed the caller's check;
        with no lease, just those), without waiting for the answer (a lease that is never
        released ends by itself)."""
        request = store_pb2.ReleasePagesRequest(lease_ids=[] if lease_id is None else [lease_id],
                                                bad_keys=bad_keys)
        try:
            call = self._release_pages.future(request, timeout=self.timeout,
                                              metadata=self._metadata)
        except (ValueError, StoreUnavailable):  # channel closed, or the breaker is open: the
            return  # lease runs out on the server instead
        with self._lock:
            self._releasing.add(call)  # an unreferenced call would be cancelled
        call.add_done_callback(self._released)

    def _released(self, call: Any) -> None:
        with self._lock:
            self._releasing.discard(call)


def chunks(items: Sequence) -> Iterator[list]:
    """`items` in calls of at most MAX_KEYS_PER_CALL."""
    for start in range(0, len(items), MAX_KEYS_PER_CALL):
        yield list(items[start : start + MAX_KEYS_PER_CALL])


def by_page_size(pages: Sequence[tuple[bytes, bytes | memoryview]]
                 ) -> dict[int, list[tuple[bytes, memoryview]]]:
    """(key, page) pairs grouped by the page's size, each page as a flat byte view, in order:
    a reservation of slots is for pages of one size."""
    groups: dict[int, list[tuple[bytes, memoryview]]] = {}
    for key, blob in pages:
        view = memoryview(blob).cast("B")
        groups.setdefault(view.nbytes, []).append((key, view))
    return groups
