"""A StoreClient's NIXL data plane: key-level gets and puts whose bytes move by NIXL READ/WRITE
between this client's registered buffers (or the caller's own tensors, host or GPU memory)
and the server's page arenas (cachestore/dataplane/initiator.py), with LeasePages /
ReservePages / CommitPages / ReleasePages over gRPC as the control path. Used when the server
offers it (DataPlaneHello) and nixl loads here; StoreClient falls back to the gRPC frames
otherwise (and for a call whose transfer fails).

Checks are the same as the frames': the client checks every page it READ (header, key,
checksum) before handing it out, reporting bad ones to the server, unless the caller checks
them itself (`is_checked_by_caller`: a worker's stager checksums on the device; bad pages are
reported with the lease's release); the server checks every page written before it becomes
visible. Puts WRITE straight from the caller's bytes (registered for the call, not copied).
Counters (`num_pages_read`, `num_pages_checked`, `num_pages_written`) say what moved and what
this side checked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import grpc
import numpy as np
import torch

from kvmesh.cachestore.client.page_gets import MAX_KEYS_PER_CALL, PageGets, by_page_size
from kvmesh.cachestore.dataplane import agent
from kvmesh.cachestore.dataplane.agent import ArenaInfo
from kvmesh.cachestore.dataplane.initiator import BufferHook, Device, Initiator
from kvmesh.cachestore.errors import InvalidRequest, ProtocolError, StoreError, StoreUnavailable
from kvmesh.cachestore.rpc import wire
from kvmesh.cachestore.rpc.status import typed_error
from kvmesh.cachestore.shm.page_lease import PageLease, pages_by_key
from kvmesh.cachestore.shm.segments import buffer_address
from kvmesh.cachestore.store.page_access import is_intact
from kvmesh.v1 import store_pb2

log = logging.getLogger(__name__)
Metadata = tuple[tuple[str, str], ...] | None


def tensor_range(tensor: torch.Tensor) -> tuple[int, int, Device]:
    """(address, nbytes, device: None on the host, else the CUDA device index) of a
    contiguous tensor's memory; InvalidRequest for any other."""
    if not tensor.is_contiguous():
        raise InvalidRequest("data-plane tensors must be contiguous")
    if tensor.device.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"data-plane tensors live on the host or a CUDA device, not "
                             f"{tensor.device}")
    device = None if tensor.device.type == "cpu" else tensor.device.index or 0
    return tensor.data_ptr(), tensor.numel() * tensor.element_size(), device


def copy_page_into(tensor: torch.Tensor, page: memoryview) -> None:
    """Copy a page into the start of a contiguous tensor (host or GPU) at least its size."""
    target = tensor.view(-1).view(torch.uint8)[: page.nbytes]
    source = np.frombuffer(page, dtype=np.uint8)
    if target.device.type == "cpu":
        np.copyto(target.numpy(), source)
    else:  # (torch will not wrap read-only memory without a warning: a copy, off the fast path)
        target.copy_(torch.from_numpy(source.copy()))


class DataPlaneCalls:
    """Thread-safe. `required`: a server or client without the plane raises StoreUnavailable
    instead of reporting itself off (`is_on`). `on_new_buffer` / `on_release_buffer`: run for
    each registered receive buffer (Initiator), e.g. to page-lock it."""

    def __init__(self, target: str, channel: grpc.Channel, page_gets: PageGets,
                 timeout: float | None, metadata: Metadata, required: bool,
                 on_new_buffer: BufferHook | None = None,
                 on_release_buffer: BufferHook | None = None) -> None:
        self.target = target
        self._page_gets, self.timeout, self._metadata = page_gets, timeout, metadata
        self.required = required
        pb, method = store_pb2, f"/{wire.SERVICE}/"
        self._rpc = {name: channel.unary_unary(method + name, req.SerializeToString,
                                               resp.FromString)
                     for name, req, resp in (
                         ("DataPlaneHello", pb.DataPlaneHelloRequest, pb.DataPlaneHelloResponse),
                         ("LeasePages", pb.PageKeys, pb.LeasePagesResponse),
                         ("ReservePages", pb.ReservePagesRequest, pb.ReservePagesResponse),
                         ("CommitPages", pb.CommitPagesRequest, pb.CommitPagesResponse))}
        self._lock = threading.Lock()
        self._initiator: Initiator | None = None
        self._why_off: str | None = None  # None: not asked yet
        self._buffer_hooks = (on_new_buffer, on_release_buffer)
        self.num_pages_read = 0  # READ into registered buffers
        self.num_pages_checked = 0  # of those, checked here (not by the caller)
        self.num_pages_written = 0  # WRITTEN into reserved slots

    def is_on(self) -> bool:
        """Whether calls go over NIXL (the first call says hello and connects)."""
        with self._lock:
            if self._why_off is None:
                self._why_off = self._start()
                if self._why_off:
                    log.info("store %s data plane: gRPC frames (%s)", self.target,
                             self._why_off)
                else:
                    log.info("store %s data plane: NIXL/UCX", self.target)
            if self._why_off and self.required:
                raise StoreUnavailable(f"data_plane=nixl, but {self._why_off}")
            return not self._why_off

    def _start(self) -> str:
        """'' once connected, else why not."""
        if agent.nixl_api() is None:
            return f"nixl unavailable here ({agent.why_unavailable()})"
        try:
            hello = self._rpc["DataPlaneHello"](store_pb2.DataPlaneHelloRequest(),
                                                timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server older than the plane
                return "the server has no DataPlaneHello"
            raise typed_error(exc) from None
        if not hello.is_offered:
            return "the server offers no data plane"
        try:
            self._initiator = Initiator(*self._buffer_hooks, timeout=self.timeout)
            self._connect(hello)
        except Exception as exc:  # a UCX that does not start, metadata it cannot load
            return f"NIXL failed to connect: {exc}"
        return ""

    def _connect(self, hello: Any = None) -> None:
        hello = hello or self._call("DataPlaneHello", store_pb2.DataPlaneHelloRequest())
        assert self._initiator is not None
        self._initiator.connect(hello.agent_metadata,
                                [ArenaInfo(a.arena_id, a.address, a.nbytes) for a in hello.arenas],
                                hello.arena_epoch)

    def _ready(self, epoch: int, places: Sequence[tuple[int, int, int]]) -> Initiator:
        """The initiator, reconnected first when the server registered arenas since."""
        assert self._initiator is not None
        if epoch != self._initiator.arena_epoch or not self._initiator.knows(places):
            self._connect()
            if not self._initiator.knows(places):
                raise ProtocolError("the server named arenas its hello does not list")
        return self._initiator

    def reserve(self, nbytes: int) -> None:
        """A registered receive buffer of `nbytes` made (and page-locked, by the hooks) now."""
        if self.is_on():
            assert self._initiator is not None
            self._initiator.reserve(nbytes)

    def owns(self, address: int, nbytes: int) -> bool:
        """The range lies in one of this client's registered buffers."""
        initiator = self._initiator
        return initiator is not None and initiator.owns(address, nbytes)

    def try_get_leased(self, keys: Sequence[bytes], prefix_only: bool,
                       is_checked_by_caller: bool = False) -> PageLease | None:
        """get_leased, or None when its transfer failed (the caller uses the frames)."""
        try:
            return self.get_leased(keys, prefix_only, is_checked_by_caller)
        except StoreError:  # the store's answer (UNAVAILABLE, PERMISSION_DENIED, ...): as is
            raise
        except OSError as exc:  # the transfer (initiator.py raises OSError for all of NIXL)
            self.failed(exc)
            return None

    def try_put(self, pages: Sequence[tuple[bytes, bytes | memoryview]], arenas: dict[str, int]
                ) -> tuple[int, list[tuple[bytes, bytes | memoryview]]]:
        """put, one reservation per page size: (pages newly stored, the pages left for the
        caller to send by PutPages: no slot for them, or their transfer failed). Adds the
        shared arenas the pages landed in (same-host server) to `arenas`."""
        stored, rest = 0, list[tuple[bytes, bytes | memoryview]]()
        for group in by_page_size(pages).values():
            num_stored, num_sent = self._guarded(partial(self.put, group, arenas))
            stored += num_stored
            rest += group[num_sent:]
        return stored, rest

    def _guarded(self, put: Callable[[], tuple[int, int]]) -> tuple[int, int]:
        """put()'s (pages stored, pages sent), or (0, 0) after a transfer failure that `failed`
        let pass (the caller sends those pages by PutPages)."""
        try:
            return put()
        except StoreError:
            raise
        except OSError as exc:
            self.failed(exc)
            return 0, 0

    def failed(self, exc: BaseException) -> None:
        """A transfer failed: StoreUnavailable when the plane is required, else logged (the
        caller uses the frames)."""
        if self.required:
            raise StoreUnavailable(f"NIXL transfer failed: {exc}") from exc
        log.warning("store %s: NIXL transfer failed (%s); this call uses gRPC frames",
                    self.target, exc)

    # -- gets ---------------------------------------------------------------------------------

    def get_leased(self, keys: Sequence[bytes], prefix_only: bool,
                   is_checked_by_caller: bool = False) -> PageLease:
        """StoreClient.get_pages_leased over NIXL: pages are read-only views into one of this
        client's registered buffers (`lease.regions`), checked here unless
        `is_checked_by_caller` (then the caller checks each page before use and reports bad
        ones with `lease.report_bad`); release the lease to reuse the buffer."""
        if len(keys) > MAX_KEYS_PER_CALL:
            raise InvalidRequest(f"at most {MAX_KEYS_PER_CALL} keys per data-plane get")
        reply = self._call("LeasePages", store_pb2.PageKeys(keys=keys, prefix_only=prefix_only))
        if (len(reply.is_found) != len(keys) or len(reply.is_elsewhere) != len(keys)
                or sum(reply.is_found) != len(reply.pages)):
            raise ProtocolError(f"LeasePages reply does not fit {len(keys)} keys")
        places = [(p.arena_id, p.offset, p.nbytes) for p in reply.pages]
        pages: list[memoryview | None] = [None] * len(keys)
        views, bad_keys, buffer = [], [], None
        initiator = self._initiator
        try:
            if places:
                initiator = self._ready(reply.arena_epoch, places)
                buffer = initiator.acquire(sum(nbytes for _, _, nbytes in places))
                offsets = initiator.read(places, buffer)
                found = [i for i, flag in enumerate(reply.is_found) if flag]
                whole = buffer.view()
                for i, offset, (_, _, nbytes) in zip(found, offsets, places, strict=True):
                    view = whole[offset : offset + nbytes]
                    views.append(view)
                    if is_checked_by_caller or is_intact(keys[i], view):
                        pages[i] = view
                    else:
                        bad_keys.append(keys[i])
                views.append(whole)
                self.num_pages_read += len(places)
                self.num_pages_checked += 0 if is_checked_by_caller else len(places)
        except BaseException:
            if buffer is not None:
                assert initiator is not None
                initiator.give_back(buffer)
            raise
        finally:
            if reply.lease_id:  # the bytes are here (or the READ failed): end it now
                self._page_gets.end_lease(reply.lease_id, bad_keys)
        elsewhere = [key for key, flag in zip(keys, reply.is_elsewhere, strict=True) if flag]
        if elsewhere:  # stored outside the arenas (disk, redis): the frames, checked there
            header, inline = self._page_gets.fetch(elsewhere, False, None)
            got = iter(pages_by_key(header.is_found, inline))
            pages = [next(got) if flag else page
                     for page, flag in zip(pages, reply.is_elsewhere, strict=True)]
        if prefix_only and None in pages:
            first = pages.index(None)
            pages[first:] = [None] * (len(pages) - first)
        if buffer is None:
            return PageLease(pages)
        assert initiator is not None
        give_back, report_bad = initiator.give_back, self._page_gets.end_lease

        def on_release(found_bad: Sequence[bytes]) -> None:
            give_back(buffer)
            if found_bad:  # by the caller (the lease itself ended after the READ)
                report_bad(None, found_bad)

        return PageLease(pages, views=views, regions=[(buffer.address, buffer.nbytes)],
                         on_release=on_release, is_shared_memory=False)

    # -- puts ---------------------------------------------------------------------------------

    def put(self, pages: Sequence[tuple[bytes, memoryview]],
            arenas: dict[str, int] | None = None) -> tuple[int, int]:
        """Write pages (all of one size, each contiguous, read in place: the caller keeps
        them alive and unchanged) into reserved slots and commit them: (pages newly stored,
        how many leading pages went this way; the caller sends the rest by PutPages).
        Raises InvalidRequest, storing nothing of this call, when the server finds a bad page
        (named as PutPages names it)."""
        if not pages:
            return 0, 0
        exports = [buffer_address(view) for _, view in pages]  # no copy; kept alive here
        return self._put_from([key for key, _ in pages], [address for address, _ in exports],
                              pages[0][1].nbytes, None, arenas)

    def _put_from(self, keys: Sequence[bytes], addresses: Sequence[int], nbytes: int,
                  device: Device, arenas: dict[str, int] | None) -> tuple[int, int]:
        """put, of pages of `nbytes` at `addresses` in `device`'s memory."""
        reply = self._call("ReservePages", store_pb2.ReservePagesRequest(
            num_pages=len(keys), page_nbytes=nbytes))
        if not reply.reservation_id or not reply.slots:
            return 0, 0
        places = [(s.arena_id, s.offset, s.nbytes) for s in reply.slots]
        if len(places) > len(keys) or any(n != nbytes for _, _, n in places):
            raise ProtocolError("ReservePages answered slots that do not fit the request")
        initiator = self._ready(reply.arena_epoch, places)
        try:
            initiator.write_from(places, addresses[: len(places)], device)
            self.num_pages_written += len(places)
        except BaseException:  # give the slots back now (a commit of no keys), not at expiry
            self._call("CommitPages", store_pb2.CommitPagesRequest(
                reservation_id=reply.reservation_id))
            raise
        keys = keys[: len(places)]
        commit = self._call("CommitPages", store_pb2.CommitPagesRequest(
            reservation_id=reply.reservation_id, keys=keys))
        if commit.is_expired:  # (a slow transfer, or a very short lease_s): the frames instead
            log.warning("store %s: reservation expired before its commit; %d pages go by "
                        "PutPages", self.target, len(keys))
            return 0, 0
        if arenas is not None:
            arenas.update(zip(commit.arena_names, commit.arena_nbytes, strict=False))
        return commit.num_pages_stored, len(places)

    # -- tensors: host or GPU memory, in place --------------------------------------------------

    def register(self, tensor: torch.Tensor) -> None:
        """Register `tensor`'s memory (host or GPU) for every later put_tensors / get_into
        within it (nothing is registered per call there) until close. The caller keeps it
        allocated until then. Raises OSError when NIXL will not register it."""
        address, nbytes, device = tensor_range(tensor)
        if self.is_on():
            assert self._initiator is not None
            self._initiator.register_region(address, nbytes, device)

    def try_put_tensors(self, pages: Sequence[tuple[bytes, torch.Tensor]]
                        ) -> tuple[int, list[tuple[bytes, torch.Tensor]]]:
        """try_put of encoded pages held in tensors (each contiguous; on a GPU: WRITTEN
        straight from its memory), one reservation per page size and device."""
        groups: dict[tuple[int, Device], list[tuple[bytes, int]]] = {}
        for key, tensor in pages:
            address, nbytes, device = tensor_range(tensor)
            groups.setdefault((nbytes, device), []).append((key, address))
        stored, rest = 0, list[tuple[bytes, torch.Tensor]]()
        by_key = dict(pages)
        for (nbytes, device), group in groups.items():
            num_stored, num_sent = self._guarded(partial(
                self._put_from, [key for key, _ in group], [address for _, address in group],
                nbytes, device, None))
            stored += num_stored
            rest += [(key, by_key[key]) for key, _ in group[num_sent:]]
        return stored, rest

    def get_into(self, keys: Sequence[bytes], destinations: Sequence[torch.Tensor],
                 prefix_only: bool) -> list[bool]:
        """READ each found page straight into its destination (destinations[i] for keys[i]:
        contiguous, all on one device, each at least the page's size; the page fills its
        start). Per key, whether it was found. Pages READ here are NOT checked: the caller
        checks each (header, key, checksum) and reports bad ones (`report_bad`); pages the
        server keeps outside its arenas come by the frames, checked, and are copied in.
        Raises OSError when the transfer fails, InvalidRequest for a destination too small."""
        if len(keys) > MAX_KEYS_PER_CALL or len(destinations) != len(keys):
            raise InvalidRequest(f"one destination per key, at most {MAX_KEYS_PER_CALL} keys")
        if not keys:
            return []
        ranges = [tensor_range(tensor) for tensor in destinations]
        devices = {device for _, _, device in ranges}
        if len(devices) > 1:
            raise InvalidRequest("get_pages_into: all destinations on one device")
        reply = self._call("LeasePages", store_pb2.PageKeys(keys=keys, prefix_only=prefix_only))
        if (len(reply.is_found) != len(keys) or len(reply.is_elsewhere) != len(keys)
                or sum(reply.is_found) != len(reply.pages)):
            raise ProtocolError(f"LeasePages reply does not fit {len(keys)} keys")
        places = [(p.arena_id, p.offset, p.nbytes) for p in reply.pages]
        found = [i for i, flag in enumerate(reply.is_found) if flag]
        try:
            for i, (_, _, nbytes) in zip(found, places, strict=True):
                if nbytes > ranges[i][1]:
                    raise InvalidRequest(f"destination {i} has {ranges[i][1]} bytes, its page "
                                         f"{nbytes}")
            if places:
                initiator = self._ready(reply.arena_epoch, places)
                initiator.read_into(places, [ranges[i][0] for i in found], devices.pop())
                self.num_pages_read += len(places)
        finally:
            if reply.lease_id:  # the bytes are here (or the READ failed): end it now
                self._page_gets.end_lease(reply.lease_id)
        is_found = [bool(flag) for flag in reply.is_found]
        elsewhere = [i for i, flag in enumerate(reply.is_elsewhere) if flag]
        if elsewhere:  # stored outside the arenas (disk, redis): the frames, checked there
            header, inline = self._page_gets.fetch([keys[i] for i in elsewhere], False, None)
            for i, page in zip(elsewhere, pages_by_key(header.is_found, inline), strict=True):
                if page is not None:
                    if page.nbytes > ranges[i][1]:
                        raise InvalidRequest(f"destination {i} has {ranges[i][1]} bytes, its "
                                             f"page {page.nbytes}")
                    copy_page_into(destinations[i], page)
                    is_found[i] = True
        if prefix_only and not all(is_found):
            first = is_found.index(False)
            is_found[first:] = [False] * (len(keys) - first)
        return is_found

    def report_bad(self, keys: Sequence[bytes]) -> None:
        """Tell the server these pages (read by get_into) failed the caller's check."""
        if keys:
            self._page_gets.end_lease(None, keys)

    def _call(self, name: str, request: Any) -> Any:
        try:
            return self._rpc[name](request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise typed_error(exc) from None

    def close(self) -> None:
        with self._lock:
            initiator, self._initiator = self._initiator, None
            self._why_off = self._why_off or "closed"
        if initiator is not None:
            initiator.close()
