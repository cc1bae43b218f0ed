"""Page pool of the KV cache: ref counts, O(1) free list, prefix cache by page key.

Pure Python (no torch), so it is tested on its own with tiny specs. It manages page ids only;
the model runner owns the bytes. Keys come from cachestore.keys (the chained page keys of the
request's namespace); a cached page also keeps its token ids, and a lookup whose tokens differ is
a miss (collision safety).

Free pages live in two places: `_free_uncached` (never filled or already evicted; a deque) and
`_free_cached` (full pages with a key whose last user left; an LRU ordered dict). Allocation takes
uncached pages first, then evicts the least recently released cached page. Sequences release
their pages deepest first, so within one sequence the deepest page is evicted first and a
prefix never loses a middle page while keeping its tail.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass


@dataclass
class Page:
    page_id: int
    ref_count: int = 0
    key: bytes | None = None  # set once the page is full and registered in the prefix cache
    parent: bytes | None = None  # key of the previous page of the sequence (None for page 0)
    token_ids: tuple[int, ...] = ()  # the page's tokens, kept for verification on lookup
    tag: object = None  # caller's opaque data for a cached page (the engine keeps its namespace)


@dataclass(frozen=True)
class EvictedPage:
    """A cached page whose slot is being reused; its bytes are still intact when reported."""

    page_id: int
    key: bytes
    parent: bytes | None
    token_ids: tuple[int, ...]
    tag: object


class BlockManager:
    """Not thread-safe: the engine's single thread owns it.

    `on_evict(pages)` is called synchronously before evicted pages are handed out again, so the
    caller can copy their bytes out (demotion to the host tier): once per `allocate` that
    evicts, with its pages shallowest first (the reverse of eviction order), so a prefix
    evicted deepest first can be demoted in prefix order (consecutive host-tier slots: loading
    it back goes as few large copies)."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        on_evict: Callable[[list[EvictedPage]], None] | None = None,
    ) -> None:
        assert num_pages > 0 and page_size > 0
        self.num_pages = num_pages
        self.page_size = page_size
        self.pages = [Page(i) for i in range(num_pages)]
        self._free_uncached: deque[int] = deque(range(num_pages))
        self._free_cached: OrderedDict[int, None] = OrderedDict()
        self._by_key: dict[bytes, int] = {}
        self._on_evict = on_evict
        self.events: list[tuple[str, list[bytes], bytes | None]] = []  # (kind, keys, parent)

    # ------------------------------------------------------------------ queries
    @property
    def num_free_pages(self) -> int:
        """Pages that can be handed out now (uncached free + evictable cached)."""
        return len(self._free_uncached) + len(self._free_cached)

    @property
    def num_cached_pages(self) -> int:
        return len(self._by_key)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= self.num_free_pages

    def match_prefix(
        self, keys: Sequence[bytes], page_tokens: Iterable[Sequence[int]]
    ) -> list[int]:
        """Page ids of the longest cached prefix of `keys` whose stored tokens equal
        `page_tokens`. Does not change ref counts or recency."""
        page_ids: list[int] = []
        for key, tokens in zip(keys, page_tokens, strict=False):
            page_id = self._by_key.get(key)
            if page_id is None or self.pages[page_id].token_ids != tuple(tokens):
                break
            page_ids.append(page_id)
        return page_ids

    def cached_entries(self) -> list[Page]:
        """Every page in the prefix cache (used or free), in page id order."""
        return [self.pages[i] for i in sorted(self._by_key.values())]

    # ------------------------------------------------------------------ mutation
    def acquire(self, page_ids: Sequence[int]) -> None:
        """Take a reference on each page (cached hits, forks). A free cached page leaves the LRU."""
        for page_id in page_ids:
            page = self.pages[page_id]
            if page.ref_count == 0:
                del self._free_cached[page_id]
            page.ref_count += 1

    def allocate(self, num_pages: int) -> list[int]:
        """Hand out `num_pages` fresh pages with ref count 1, evicting LRU cached pages as needed.
        The caller checks `can_allocate` first."""
        if not self.can_allocate(num_pages):
            raise RuntimeError(f"allocate({num_pages}) with {self.num_free_pages} free pages")
        page_ids: list[int] = []
        evicted: list[EvictedPage] = []
        for _ in range(num_pages):
            if self._free_uncached:
                page_id = self._free_uncached.popleft()
            else:
                page_id, _ = self._free_cached.popitem(last=False)
                evicted.append(self._evict(self.pages[page_id]))
            self.pages[page_id].ref_count = 1
            page_ids.append(page_id)
        if self._on_evict is not None and evicted:  # bytes intact until the caller writes
            self._on_evict(evicted[::-1])
        return page_ids

    def register(
        self,
        page_id: int,
        key: bytes,
        parent: bytes | None,
        token_ids: Sequence[int],
        tag: object = None,
    ) -> bool:
        """Enter a full, computed page in the prefix cache. Returns False when the key is already
        cached by another page (the page then stays a private, uncached page)."""
        assert len(token_ids) == self.page_size
        return bool(self.register_run([page_id], [key], parent, token_ids, tag))

    def register_run(self, page_ids: Sequence[int], keys: Sequence[bytes],
                     parent: bytes | None, token_ids: Sequence[int], tag: object = None
                     ) -> list[int]:
        """`register` for consecutive pages of one sequence in one pass: page_ids[i] holds
        keys[i], whose parent is keys[i - 1] (`parent` for the first) and whose tokens are
        token_ids[i * page_size : (i + 1) * page_size]. Returns the indices of the pages
        registered (one whose key another page caches already is skipped)."""
        ps = self.page_size
        assert len(page_ids) == len(keys) and len(token_ids) == ps * len(keys)
        pages, by_key = self.pages, self._by_key
        done: list[int] = []
        events = self.events
        for i, page_id in enumerate(page_ids):
            key = keys[i]
            page = pages[page_id]
            assert page.ref_count > 0 and page.key is None
            if key not in by_key:
                page.key, page.parent, page.tag = key, parent, tag
                page.token_ids = tuple(token_ids[i * ps : (i + 1) * ps])
                by_key[key] = page_id
                events.append(("stored", [key], parent))
                done.append(i)
            parent = key
        return done

    def unregister(self, page_id: int) -> None:
        """Take a page its one user registered back out of the prefix cache (its contents
        turned out bad); it stays that user's, as a private page."""
        page = self.pages[page_id]
        assert page.ref_count == 1 and page.key is not None
        self.events.append(("removed", [page.key], None))
        self._forget(page)

    def release(self, page_ids: Sequence[int]) -> None:
        """Drop one reference on each page, deepest (last) first. A page reaching zero becomes
        evictable (cached, most recently used end) or plainly free (uncached)."""
        for page_id in reversed(page_ids):
            page = self.pages[page_id]
            assert page.ref_count > 0, f"double free of page {page_id}"
            page.ref_count -= 1
            if page.ref_count:
                continue
            if page.key is None:
                self._free_uncached.append(page_id)
            else:
                self._free_cached[page_id] = None

    def touch(self, page_ids: Sequence[int]) -> None:
        """Mark free cached pages as just used (a lookup that found them), deepest last-evicted."""
        for page_id in reversed(page_ids):
            if page_id in self._free_cached:
                self._free_cached.move_to_end(page_id)

    def copy_on_write(self, page_id: int) -> int | None:
        """Before appending to `page_id` (a partial page): if another sequence shares it, give
        the caller a private page to copy it into. Returns the new page id, or None if the page
        is already private. The caller copies the bytes and swaps the id in its page table."""
        page = self.pages[page_id]
        if page.ref_count == 1:
            return None
        assert page.key is None, "a shared full page is never written to"
        (new_id,) = self.allocate(1)
        page.ref_count -= 1
        return new_id

    def clear(self) -> int:
        """Drop every free cached page from the prefix cache; returns how many were dropped."""
        dropped = 0
        while self._free_cached:
            page_id, _ = self._free_cached.popitem(last=False)
            self._forget(self.pages[page_id])
            self._free_uncached.append(page_id)
            dropped += 1
        self.events.append(("cleared", [], None))
        return dropped

    # ------------------------------------------------------------------ internals
    def _evict(self, page: Page) -> EvictedPage:
        assert page.key is not None
        evicted = EvictedPage(page.page_id, page.key, page.parent, page.token_ids, page.tag)
        self.events.append(("removed", [page.key], None))
        self._forget(page)
        return evicted

    def _forget(self, page: Page) -> None:
        assert page.key is not None
        del self._by_key[page.key]
        page.key, page.parent, page.token_ids, page.tag = None, None, (), None
