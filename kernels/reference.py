"""Torch reference of the paged-attention kernels.

These are exact (fp32 math) and vectorized per sequence, so the CPU engine uses them for real
inference and the Triton kernels are tested against them.

Layout (see ARCHITECTURE.md):
  kv_pool:    [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim]  (K at 0, V at 1)
  page_table: [num_seqs, max_pages] int32; entries past a sequence's pages are ignored
  seq_lens:   [num_seqs] int32, total tokens of each sequence including the new ones

Sliding window (Mistral; transformers' `sliding_window_causal_mask_function`): with
`sliding_window=w` a query at position p attends the keys at positions k with p - w < k <= p;
None is full causal attention. Pages wholly before every query's window are never read.
"""

from __future__ import annotations

import torch


def check_gqa(num_heads: int, num_kv_heads: int) -> int:
    """Return the GQA group size; raise ValueError when the heads do not divide."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads != 0:
        raise ValueError(
            f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
        )
    return num_heads // num_kv_heads


def check_sliding_window(sliding_window: int | None) -> None:
    """Raise ValueError unless sliding_window is None or an int >= 1."""
    if sliding_window is None:
        return
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) \
            or sliding_window < 1:
        raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")


def first_window_key(first_query_pos: int, sliding_window: int | None) -> int:
    """Position of the first key a query at first_query_pos (or any later query) may attend."""
    return 0 if sliding_window is None else max(first_query_pos - sliding_window + 1, 0)


def write_kv_ref(
    kv_pool: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new K/V into the pool; mutates kv_pool[:, layer].

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int64
    (slot = page_id * page_size + offset).
    """
    num_pages, _, _, page_size, num_kv_heads, head_dim = kv_pool.shape
    if k.shape != v.shape or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k/v shape {tuple(k.shape)}/{tuple(v.shape)} does not match the pool")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError("slot_mapping must be [num_tokens]")
    slots = slot_mapping.to(device=kv_pool.device, dtype=torch.int64)
    page_ids = torch.div(slots, page_size, rounding_mode="floor")
    offsets = slots - page_ids * page_size
    kv_pool[page_ids, layer, 0, offsets] = k.to(kv_pool.dtype)
    kv_pool[page_ids, layer, 1, offsets] = v.to(kv_pool.dtype)


def gather_kv(
    kv_pool: torch.Tensor, layer: int, page_row: torch.Tensor, seq_len: int, first_page: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K, V of one sequence's positions first_page * page_size ... seq_len - 1:
    each [seq_len - first_page * page_size, num_kv_heads, head_dim] (pool dtype)."""
    page_size = kv_pool.shape[3]
    num_seq_pages = (seq_len + page_size - 1) // page_size
    pages = page_row[first_page:num_seq_pages].to(device=kv_pool.device, dtype=torch.int64)
    # kv: [num_seq_pages - first_page, 2, page_size, num_kv_heads, head_dim]
    kv = kv_pool[pages, layer]
    num_tokens = seq_len - first_page * page_size
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:num_tokens]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:num_tokens]
    return k, v


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, context_len: int,
    sliding_window: int | None,
) -> torch.Tensor:
    """Causal (optionally windowed) attention of the last q.shape[0] positions of a context_len
    sequence over its last k.shape[0] keys.

    q: [num_q, num_heads, head_dim]; k, v: [num_k, num_kv_heads, head_dim] -> fp32 out.
    """
    num_q, num_heads, head_dim = q.shape
    group = check_gqa(num_heads, k.shape[1])
    qf = q.float().view(num_q, k.shape[1], group, head_dim)
    kf = k.float()
    vf = v.float()
    # scores: [num_kv_heads, group, num_q, num_k]
    scores = torch.einsum("qhgd,khd->hgqk", qf, kf) * scale
    q_pos = torch.arange(context_len - num_q, context_len, device=q.device)
    k_pos = torch.arange(context_len - k.shape[0], context_len, device=q.device)
    hidden = k_pos[None, :] > q_pos[:, None]
    if sliding_window is not None:
        hidden |= k_pos[None, :] <= q_pos[:, None] - sliding_window
    scores.masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,khd->qhgd", probs, vf)
    return out.reshape(num_q, num_heads, head_dim)


def paged_decode_ref(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """One query (the last token) per sequence. q: [num_seqs, num_heads, head_dim] -> same shape.

    Reads kv_pool only. Every seq_len must be >= 1. The whole batch is gathered at once, padded
    to the longest sequence (with a window: from each sequence's first page in the window, padded
    to the most pages any window spans), so the cost does not grow with a Python loop over
    sequences.
    """
    num_seqs, num_heads, head_dim = q.shape
    if num_seqs == 0:
        return torch.empty_like(q)
    check_sliding_window(sliding_window)
    page_size, num_kv_heads = kv_pool.shape[3], kv_pool.shape[4]
    group = check_gqa(num_heads, num_kv_heads)
    lens = seq_lens.to(device=kv_pool.device, dtype=torch.int64)
    if bool((lens < 1).any()):
        raise ValueError(f"decode needs every seq_len >= 1, got {seq_lens.tolist()}")
    num_seq_pages = (lens + page_size - 1) // page_size
    if int(num_seq_pages.max()) > page_table.shape[1]:
        raise ValueError(f"seq_lens need {int(num_seq_pages.max())} pages, page_table has "
                         f"{page_table.shape[1]}")
    # first visible key: [num_seqs]; pages before the one holding it are not gathered
    first_key = lens * 0 if sliding_window is None else (lens - sliding_window).clamp(min=0)
    first_page = first_key // page_size
    max_pages = int((num_seq_pages - first_page).max())
    # page_idx: [num_seqs, max_pages], the sequence's page index of each gathered page
    page_idx = first_page[:, None] + torch.arange(max_pages, device=kv_pool.device)[None, :]
    # entries past a sequence's pages may hold anything: point them at page 0, masked below
    in_seq = page_idx < num_seq_pages[:, None]
    table = page_table.to(device=kv_pool.device, dtype=torch.int64)
    pages = torch.gather(table, 1, torch.where(in_seq, page_idx, 0))
    pages = torch.where(in_seq, pages, 0)
    # kv: [num_seqs, max_pages, 2, page_size, num_kv_heads, head_dim]
    kv = kv_pool[pages, layer]
    max_tokens = max_pages * page_size
    pos = first_page[:, None] * page_size + torch.arange(max_tokens, device=kv_pool.device)
    valid = (pos < lens[:, None]) & (pos >= first_key[:, None])
    # k, v: [num_seqs, max_tokens, num_kv_heads, head_dim], zero at padding (which may be NaN)
    k = kv[:, :, 0].reshape(num_seqs, max_tokens, num_kv_heads, head_dim).float()
    v = kv[:, :, 1].reshape(num_seqs, max_tokens, num_kv_heads, head_dim).float()
    k = k.masked_fill(~valid[:, :, None, None], 0.0)
    v = v.masked_fill(~valid[:, :, None, None], 0.0)
    qf = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    # scores: [num_seqs, num_kv_heads, group, max_tokens]
    scores = torch.einsum("bhgd,bthd->bhgt", qf, k) * scale
    scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgt,bthd->bhgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


def paged_prefill_ref(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    layer: int,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Varlen extend attention over cached prefix + the new tokens (already in the pool).

    q: [total_q, num_heads, head_dim]; cu_seqlens_q: [num_seqs + 1] int32. Sequence i's new tokens
    are the last (cu_seqlens_q[i+1] - cu_seqlens_q[i]) of its seq_lens[i] positions; causal
    (and windowed, see the module docstring). A zero-length chunk is allowed. Returns
    [total_q, num_heads, head_dim] in q's dtype.
    """
    check_sliding_window(sliding_window)
    page_size = kv_pool.shape[3]
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        num_q = end - start
        if num_q < 0 or num_q > seq_len:
            raise ValueError(f"sequence {i}: {num_q} new tokens but seq_len {seq_len}")
        if num_q == 0:
            continue
        # keys from the first query's first visible one; pages before its page are not read
        first_key = first_window_key(seq_len - num_q, sliding_window)
        first_page = first_key // page_size
        k, v = gather_kv(kv_pool, layer, page_table[i], seq_len, first_page)
        skip = first_key - first_page * page_size
        k, v = k[skip:], v[skip:]
        out[start:end] = _attend(q[start:end], k, v, scale, seq_len, sliding_window).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.fused.rms_norm: with residual, s = x + residual (in x's dtype) is
    written into residual (mutated) and (norm(s), residual) is returned.

    norm is transformers' LlamaRMSNorm: normalize in fp32, round to dtype, multiply by weight.
    x: [num_tokens, hidden], weight: [hidden].
    """
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    result = weight * normed
    if out is not None:
        result = out.copy_(result)
    return result if residual is None else (result, residual)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    """NeoX-style RoPE on q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads,
    head_dim] in place (mutates both; views work). Computed in fp32, rounded once.

    cos_cache, sin_cache: [max_positions, head_dim] fp32; positions: [num_tokens] integer.
    """
    # cos, sin: [num_tokens, 1, head_dim] fp32, broadcast over heads
    cos = cos_cache[positions.long()].float()[:, None, :]
    sin = sin_cache[positions.long()].float()[:, None, :]
    for x in (q, k):
        xf = x.float()
        x.copy_(xf * cos + rotate_half(xf) * sin)


def silu_and_mul_ref(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up in fp32 for x = [gate | up]: [num_tokens, 2 * inter] -> [num_tokens, inter]
    in x's dtype; out, if given, is written and returned."""
    inter = x.shape[-1] // 2
    result = (torch.nn.functional.silu(x[:, :inter].float()) * x[:, inter:].float()).to(x.dtype)
    return result if out is None else out.copy_(result)
