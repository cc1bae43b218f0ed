"""A prompt's cached pages moved straight from one worker to another: the direct push of a
disaggregated request (`GenerateRequest.push_to`, `Worker.PushPages`). Engine thread only: the
service runs these through `EngineLoop.call`.

The prefill worker exports the prompt's full pages that its device cache holds (its prefix),
encoded as the store encodes them; the decode worker checks every page against its own
namespace for the tenant (header, key, token ids, checksum) and puts the good leading run into
its host tier, where its next lookup of the prompt finds them ("cpu" in its usage).
"""

from __future__ import annotations

from typing import Any

from kvmesh.cachestore.codec import PageCorrupt, decode_page, encode_page
from kvmesh.cachestore.keys import Namespace, tokens_to_bytes
from kvmesh.workers.errors import NoHostTier


def prompt_pages(ns: Namespace, prompt: list[int]) -> tuple[list[bytes], list[list[int]]]:
    """Keys and token ids of the prompt's full pages."""
    keys = ns.page_keys(prompt)
    ps = ns.page_size
    return keys, [prompt[i * ps : (i + 1) * ps] for i in range(len(keys))]


def export_prompt_pages(engine: Any, tenant_salt: str, prompt: list[int]) -> list[bytes]:
    """The encoded pages of the prompt's longest prefix on the device (maybe none)."""
    ns = engine.namespace(tenant_salt)
    keys, tokens = prompt_pages(ns, prompt)
    page_ids = engine.block_manager.match_prefix(keys, tokens)
    return [encode_page(ns, keys[i], tokens_to_bytes(tokens[i]),
                        engine.runner.pages.read_page(page_id))
            for i, page_id in enumerate(page_ids)]


def import_prompt_pages(engine: Any, tenant_salt: str, prompt: list[int], first_page: int,
                        blobs: list[bytes]) -> int:
    """Put `blobs`, the prompt's pages from `first_page` on, into the host tier; returns how
    many were taken: the leading run that checks out (a page that does not ends it). Raises
    NoHostTier on a worker without one."""
    if engine.offload.host is None:
        raise NoHostTier("this worker has no host tier to take pages into "
                         "(kvmesh worker --host-tier-bytes)")
    ns = engine.namespace(tenant_salt)
    keys, tokens = prompt_pages(ns, prompt)
    good: list[tuple[bytes, bytes]] = []
    for index, blob in enumerate(blobs, start=first_page):
        if index >= len(keys):
            break
        try:
            decode_page(blob, ns, keys[index], tokens_to_bytes(tokens[index]))
        except PageCorrupt:
            break
        good.append((keys[index], blob))
    engine.offload.accept_pages(good, keys[first_page - 1] if first_page else None)
    return len(good)
