"""Pages moved straight between the caller's tensors and a real store server over the NIXL plane
(StoreClient.put_tensor_pages / get_pages_into / register_memory): host tensors here on CPU,
GPU tensors (NIXL "VRAM") in the `gpu` test; and the frames' fallback for a client without the
plane."""

from __future__ import annotations

import pytest
import torch
from test_grpc_dataplane import make_pages

from kvmesh.cachestore import StoreClient
from kvmesh.cachestore.config import StoreConfig
from kvmesh.cachestore.dataplane import agent
from kvmesh.cachestore.errors import InvalidRequest
from kvmesh.cachestore.rpc.server import serve_store

pytestmark = pytest.mark.skipif(agent.nixl_api() is None, reason="nixl is not installed")


@pytest.fixture(scope="module")
def server():
    srv = serve_store(StoreConfig(port=0, cpu_bytes=32 << 20, data_plane="nixl"))
    yield srv
    srv.stop(grace=0)


@pytest.fixture
def nixl(server):
    with StoreClient(server.target, data_plane="nixl", shared_memory=False) as c:
        yield c


def as_tensor_pages(pages, device: str = "cpu") -> tuple[torch.Tensor, list]:
    """The pages laid out back to back in one uint8 tensor (a worker's KV arena), and
    (key, slice) pairs into it."""
    nbytes = len(pages[0][1])
    arena = torch.frombuffer(bytearray(b"".join(blob for _, blob in pages)),
                             dtype=torch.uint8).to(device)
    return arena, [(key, arena[i * nbytes : (i + 1) * nbytes]) for i, (key, _) in
                   enumerate(pages)]


def round_trip(client: StoreClient, pages, device: str) -> None:
    arena, tensor_pages = as_tensor_pages(pages, device)
    assert client.put_tensor_pages(tensor_pages) == len(pages)
    keys = [key for key, _ in pages]
    nbytes = len(pages[0][1])
    into = torch.zeros((len(pages) + 1) * nbytes, dtype=torch.uint8, device=device)
    destinations = [into[i * nbytes : (i + 1) * nbytes] for i in range(len(pages) + 1)]
    missing = b"\x00" * 16
    assert client.get_pages_into([*keys, missing], destinations) == [True] * len(pages) + [False]
    assert torch.equal(into[: len(pages) * nbytes].cpu(), arena.cpu())
    assert not into[len(pages) * nbytes :].any()  # the missing page's room is untouched
    assert client.get_pages([*keys, missing]) == [blob for _, blob in pages] + [None]


def test_host_tensors_round_trip_over_the_plane(nixl):
    pages = make_pages(5, seed=70)
    round_trip(nixl, pages, "cpu")
    assert nixl._plane.num_pages_written == 5
    assert nixl._plane.num_pages_read >= 5
    assert nixl._plane.num_pages_checked == 5  # get_pages checked; get_pages_into did not


def test_registered_memory_is_not_registered_again_per_call(nixl, monkeypatch):
    pages = make_pages(4, seed=71)
    arena, tensor_pages = as_tensor_pages(pages)
    into = torch.zeros_like(arena)
    assert nixl.register_memory(arena) and nixl.register_memory(into)
    monkeypatch.setattr(nixl._plane._initiator.agent, "register_memory",
                        lambda *a: pytest.fail("registered per call"))
    nbytes = len(pages[0][1])
    assert nixl.put_tensor_pages(tensor_pages) == 4
    found = nixl.get_pages_into([key for key, _ in pages],
                                [into[i * nbytes : (i + 1) * nbytes] for i in range(4)])
    assert found == [True] * 4 and torch.equal(into, arena)


def test_prefix_only_and_destinations_too_small(nixl):
    pages = make_pages(3, seed=72)
    arena, tensor_pages = as_tensor_pages(pages)
    assert nixl.put_tensor_pages([tensor_pages[0], tensor_pages[2]]) == 2
    nbytes = len(pages[0][1])
    into = [torch.zeros(nbytes, dtype=torch.uint8) for _ in pages]
    assert nixl.get_pages_into([key for key, _ in pages], into, prefix_only=True) == [
        True, False, False]
    assert bytes(into[0].numpy()) == pages[0][1] and not into[2].any()
    with pytest.raises(InvalidRequest):
        nixl.get_pages_into([pages[0][0]], [torch.zeros(nbytes - 1, dtype=torch.uint8)])
    with pytest.raises(InvalidRequest):
        nixl.get_pages_into([pages[0][0]], [torch.zeros(2 * nbytes, dtype=torch.uint8)[::2]])


def test_without_the_plane_tensors_go_by_the_frames_checked(server):
    pages = make_pages(4, seed=73)
    with StoreClient(server.target, data_plane="grpc", shared_memory=False) as frames:
        round_trip(frames, pages, "cpu")
        assert frames.register_memory(torch.zeros(8, dtype=torch.uint8)) is False


@pytest.mark.gpu
def test_gpu_tensors_round_trip_over_the_plane(nixl):
    """NIXL "VRAM" descriptors: UCX (nixl-cu13's, built with CUDA) WRITEs from and READs into
    device memory; registered once (a worker's KV cache) and per call."""
    assert torch.cuda.is_available()
    round_trip(nixl, make_pages(6, seed=74), "cuda")  # registered per call
    pages = make_pages(6, seed=75)
    arena, tensor_pages = as_tensor_pages(pages, "cuda")
    assert nixl.register_memory(arena)
    assert nixl.put_tensor_pages(tensor_pages) == 6
    nbytes = len(pages[0][1])
    into = torch.zeros_like(arena)
    assert nixl.register_memory(into)
    found = nixl.get_pages_into([key for key, _ in pages],
                                [into[i * nbytes : (i + 1) * nbytes] for i in range(6)])
    assert found == [True] * 6 and torch.equal(into, arena)
    assert nixl._plane.num_pages_written == 12
