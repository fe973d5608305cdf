"""Preallocated KV storage: one K and one V buffer per layer, plus one workspace shared by all layers.

The storage makes no decisions; a policy (``amskv.kvcache.policy``) does. Layout per layer:
``k[rows, heads, capacity, head_dim]`` holds the kept scales contiguously, oldest first, so attention
over [kept scales + current scale] is one SDPA call on a prefix view. The current scale is written
right after the kept ones when it fits; otherwise the kept scales and the current one are assembled
in the workspace (sized for the largest such moment of any layer). Evicting a scale compacts the
buffer, so its memory is really reused. Nothing here calls ``torch.cat``.

A ``KVPool`` holds these buffers for the largest batch once; every ``KVCache`` is views of a run of its rows
(one storage path: a call without the manager's pool gets a pool of its own), so batch after batch allocates
nothing. The one exception is online AMS-KV with a profile: a
layer that expands although the profile did not plan it gets a larger buffer on the spot (``unplanned``),
but only within the pool's ``GrowthAllowance``: an expansion whose buffers would not fit is refused (the
layer keeps ``c_min``), so a budget the pool's owner grants is never exceeded.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from amskv.kvcache.policy import Decision, KVPolicy, LayerState
from amskv.kvcache.similarity import key_similarity


@dataclass(frozen=True)
class Segment:
    scale: int
    start: int
    length: int


# The profiler range around every K/V allocation (pool, a cache's own buffers, growth), so that an allocator
# trace (torch.profiler with profile_memory=True) can tell K/V from activations: tests measure the KV peak with
# it (tests/amskv/kvcache/test_budget.py), not with our own sums.
KV_RANGE = "amskv.kv"


@dataclass
class GrowthAllowance:
    """Bytes that caches may allocate beyond their plan: online AMS-KV's expansions a profile did not plan.

    The pool's owner (the KV manager) grants ``room_bytes`` for one call (None: unbounded, the CLI's and the
    benchmarks' calls without a budget). An expansion is accepted only when the peak of the buffers it may grow
    into (``LayerKV.growth_peak_bytes``) fits in what is left; otherwise it is refused, the layer keeps its
    ``c_min`` budget, and the layer is listed in ``refused_layers``: "no room" is a value, as in the slots.
    """

    room_bytes: int | None = None
    reserved_bytes: int = 0  # the growth peaks of the expansions accepted so far
    refused_layers: set[int] = field(default_factory=set)  # layers refused and never expanded since

    def reserve(self, layer: int, nbytes: int) -> bool:
        """Take ``nbytes`` for ``layer``'s expansion if they fit; False (counted) when they do not."""
        if self.room_bytes is not None and self.reserved_bytes + nbytes > self.room_bytes:
            self.refused_layers.add(layer)
            return False
        self.reserved_bytes += nbytes
        self.refused_layers.discard(layer)  # refused at an earlier scale, it fits now: it expanded after all
        return True


class KVPool:
    """K/V buffers for up to ``images`` images (both CFG rows), allocated once from a plan's token counts.

    ``growth``: what caches on the pool may allocate beyond it (unbounded until the owner sets a budget)."""

    def __init__(self, images: int, heads: int, head_dim: int, capacities: list[int], workspace_tokens: int,
                 dtype, device):
        rows = 2 * images
        self.images, self.capacities, self.workspace_tokens = images, tuple(capacities), workspace_tokens
        self.heads, self.head_dim = heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.growth = GrowthAllowance()
        with record_function(KV_RANGE):
            self.k = [torch.empty(rows, heads, c, head_dim, dtype=dtype, device=device) for c in capacities]
            self.v = [torch.empty_like(k) for k in self.k]
            self.ws_k = torch.empty(rows, heads, workspace_tokens, head_dim, dtype=dtype, device=device) \
                if workspace_tokens else None
            self.ws_v = torch.empty_like(self.ws_k) if self.ws_k is not None else None

    @property
    def nbytes(self) -> int:
        tensors = self.k + self.v + [t for t in (self.ws_k, self.ws_v) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def fits(self, rows: int, capacities: list[int], workspace_tokens: int, dtype, row_offset: int = 0) -> bool:
        return (row_offset + rows <= 2 * self.images and tuple(capacities) == self.capacities
                and workspace_tokens == self.workspace_tokens and dtype == self.dtype)


class Workspace:
    """Scratch K/V for one layer at a time: [kept scales + current scale] when they exceed the layer buffer.
    Layers take turns with it, so a cache's rows of the pool's one workspace serve every layer."""

    def __init__(self, ws_k: torch.Tensor, ws_v: torch.Tensor, rows: int):
        self.k, self.v = ws_k[:rows], ws_v[:rows]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class LayerKV:
    """The object a layer's attention talks to: ``attend`` before SDPA, ``commit`` after it."""

    def __init__(self, cache: KVCache, layer: int, pool: KVPool):
        # a weak reference: a cycle (cache -> layers -> cache) would keep this batch's own and grown buffers
        # alive until the garbage collector runs, past the call, and so past the budget (measured)
        self.cache: KVCache = weakref.proxy(cache)
        self.layer = layer
        # views of the pool's rows from the cache's offset: contiguous, nothing allocated
        first, rows = cache.row_offset, cache.rows
        self.k, self.v = pool.k[layer][first:first + rows], pool.v[layer][first:first + rows]
        self.capacity = pool.capacities[layer]
        self.grown_bytes = 0  # bytes of the buffer this layer grew into beyond the plan (0: the planned one)
        self.segments: list[Segment] = []
        self.length = 0
        self.state: LayerState = cache.policy.init_layer(layer)
        self._pending: tuple[int, bool, int] | None = None  # (tokens, in_workspace, kept_before)
        self._buf: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Place the current scale after the kept ones; returns (rows, H, kept + T, hd) views."""
        T, n = k.shape[2], self.length
        ws = self.cache.workspace
        if n + T > self.capacity and (ws is None or n + T > ws.k.shape[2]):
            self._grow(n + T)  # an expansion the plan did not foresee (online AMS-KV with a profile)
        if n + T <= self.capacity:
            buf_k, buf_v, in_ws = self.k, self.v, False
        else:
            assert ws is not None  # kept + current exceeds the buffer only where the workspace holds it
            buf_k, buf_v, in_ws = ws.k, ws.v, True
            buf_k[:, :, :n].copy_(self.k[:, :, :n])
            buf_v[:, :, :n].copy_(self.v[:, :, :n])
        buf_k[:, :, n:n + T].copy_(k)
        buf_v[:, :, n:n + T].copy_(v)
        self._pending, self._buf = (T, in_ws, n), (buf_k, buf_v)
        k_all, v_all = buf_k[:, :, :n + T], buf_v[:, :, :n + T]
        if self.cache.observer is not None:
            self.cache.observer(self.layer, self.cache.scale, q, k_all, v_all, self.segments)
        return k_all, v_all

    def _grow(self, tokens: int) -> None:
        """Replace the buffer by one of ``tokens`` positions, keeping the kept prefix; counted as unplanned."""
        if not self.cache.allow_growth:
            raise RuntimeError(f"layer {self.layer}: {tokens} tokens exceed the planned capacity")
        with record_function(KV_RANGE):
            k = torch.empty(*self.k.shape[:2], tokens, self.k.shape[3], dtype=self.k.dtype, device=self.k.device)
            v = torch.empty_like(k)
        k[:, :, :self.length].copy_(self.k[:, :, :self.length])
        v[:, :, :self.length].copy_(self.v[:, :, :self.length])
        grown_before = self.grown_bytes
        self.k, self.v, self.capacity = k, v, tokens
        self.grown_bytes = 2 * k.numel() * k.element_size()
        self.cache.note_growth(self.grown_bytes, grown_before)

    def similarity(self) -> float:
        """Mean cosine similarity of the previous scale's keys (bilinearly resized) to the current keys.

        Keys are L2-normalised per head, so this ranks layers like the AMS-KV paper's negative L2 distance
        (docs/kv-cache.md §5). One value per layer: averaged over rows (batch and CFG), heads and tokens.
        """
        si = self.cache.scale
        prev = next((s for s in self.segments if s.scale == si - 1), None)
        if prev is None:
            return float("inf")  # nothing to compare with: treat the layer as cache-efficient
        assert self._pending is not None and self._buf is not None, "similarity() is asked between attend and commit"
        T, _, n = self._pending
        k_prev = self.k[:, :, prev.start:prev.start + prev.length]  # (rows, H, pn_prev^2, hd)
        k_cur = self._buf[0][:, :, n:n + T]  # (rows, H, pn^2, hd)
        sim = key_similarity(k_prev, k_cur, self.cache.patch_nums[si - 1], self.cache.patch_nums[si])
        self.cache.similarities.setdefault(self.layer, {})[si] = sim
        return sim

    def growth_peak_bytes(self, before: LayerState) -> int:
        """The most bytes this layer's grown buffers would hold at once if it expanded at this scale.

        The policy is replayed on token counts from this scale on, as a demanding layer, from ``before`` (its
        state before this scale's decision), against this layer's capacity and the shared workspace, as
        ``attend`` and ``commit`` would grow it; while a grown buffer is replaced by a larger one, both exist.
        """
        tokens, policy = self.cache.scale_tokens, self.cache.policy
        state = dataclasses.replace(before, kept=list(before.kept))
        workspace = self.cache.workspace.k.shape[2] if self.cache.workspace is not None else 0
        capacity, held, peak, kept = self.capacity, 0, 0, self.length
        for si in range(self.cache.scale, len(tokens)):
            sizes = []
            if si > self.cache.scale and kept + tokens[si] > max(capacity, workspace):
                sizes.append(kept + tokens[si])  # attend: kept + current fit neither the buffer nor the workspace
            policy.decide(state, self.layer, si, tokens, lambda: -math.inf, can_expand=True)
            kept = sum(tokens[s] for s in state.kept)
            sizes.append(kept)  # commit: the survivors
            for size in sizes:
                if size > capacity:
                    peak, held, capacity = max(peak, held + size * self._token_bytes), size * self._token_bytes, size
        return peak

    @property
    def _token_bytes(self) -> int:
        return 2 * self.k.shape[0] * self.k.shape[1] * self.k.shape[3] * self.k.element_size()

    def commit(self) -> None:
        assert self._pending is not None and self._buf is not None, "commit() follows attend()"
        T, in_ws, n = self._pending
        si = self.cache.scale
        policy = self.cache.policy
        planned = policy.is_planned(self.layer)
        can_expand: bool | Callable[[], bool] = planned
        if not planned and self.cache.allow_growth:  # growth beyond the plan, within the pool's allowance
            before = dataclasses.replace(self.state, kept=list(self.state.kept))

            def reserve_growth() -> bool:  # asked only when the expansion is due
                return self.cache.growth.reserve(self.layer, self.growth_peak_bytes(before))
            can_expand = reserve_growth
        decision: Decision = policy.decide(self.state, self.layer, si, self.cache.scale_tokens, self.similarity,
                                           can_expand=can_expand)
        current = Segment(si, n, T)
        survivors = [s for s in self.segments if s.scale not in decision.evict]
        if decision.keep:
            survivors.append(current)
        src_k, src_v = self._buf
        kept_tokens = sum(seg.length for seg in survivors)
        if kept_tokens > self.capacity:
            self._grow(kept_tokens)  # src_k/src_v still hold the old buffer: every survivor is copied over
        moved = self.k is not src_k
        pos, new_segments = 0, []
        for seg in survivors:
            if moved or seg.start != pos:
                block_k = src_k[:, :, seg.start:seg.start + seg.length]
                block_v = src_v[:, :, seg.start:seg.start + seg.length]
                if not moved:  # moving left inside one buffer may overlap: copy through a temporary
                    block_k, block_v = block_k.clone(), block_v.clone()
                self.k[:, :, pos:pos + seg.length].copy_(block_k)
                self.v[:, :, pos:pos + seg.length].copy_(block_v)
            new_segments.append(Segment(seg.scale, pos, seg.length))
            pos += seg.length
        self.segments, self.length = new_segments, pos
        self._pending = self._buf = None
        self.cache.note_commit(self.layer, self.length)

    def kept_scales(self) -> list[int]:
        return [s.scale for s in self.segments]


class KVCache:
    """All layers' storage for one batch, allocated from a memory plan (``amskv.memory.plan_kv``)."""

    def __init__(self, policy: KVPolicy, patch_nums: tuple[int, ...], pool: KVPool, rows: int, *,
                 row_offset: int = 0, observer=None, growth: bool = True):
        """Views of ``rows`` rows of ``pool`` from ``row_offset`` (a scheduler's slots; a batch of its own gets a
        pool of its own, ``amskv.generate.allocate_cache``). ``growth`` False: nothing is ever allocated outside
        the pool, so an expansion the plan did not reserve is refused."""
        if not 0 <= row_offset <= row_offset + rows <= 2 * pool.images:
            raise ValueError(f"rows {row_offset}..{row_offset + rows} are not in the KV pool of {pool.images} images")
        self.policy, self.patch_nums = policy, tuple(patch_nums)
        self.row_offset = row_offset
        self.scale_tokens = tuple(p * p for p in self.patch_nums)
        self.rows, self.heads, self.head_dim = rows, pool.heads, pool.head_dim
        self.dtype, self.device = pool.dtype, pool.device
        self.observer = observer
        self.scale = 0
        self.similarities: dict[int, dict[int, float]] = {}
        self.pool = pool
        # growth is legitimate only when the plan is a profile's, not the worst case
        self.allow_growth = growth and policy.planned is not None
        self.growth = pool.growth
        self.unplanned_bytes = 0  # the peak of the grown buffers held at once (a replaced one is freed)
        self._grown_now = 0
        self.workspace = Workspace(pool.ws_k, pool.ws_v, rows) \
            if pool.ws_k is not None and pool.ws_v is not None else None
        self.layers = [LayerKV(self, i, pool) for i in range(len(pool.capacities))]
        self.planned_bytes = self._held_bytes()
        self._stored_tokens = [0] * len(pool.capacities)
        self.peak_stored_tokens = 0
        self.kept_after_scale: list[list[list[int]]] = []  # [scale][layer] -> kept scale indices

    def __getitem__(self, layer: int) -> LayerKV:
        return self.layers[layer]

    def begin_scale(self, si: int) -> None:
        self.scale = si

    def end_scale(self) -> None:
        self.kept_after_scale.append([layer.kept_scales() for layer in self.layers])

    def note_commit(self, layer: int, tokens: int) -> None:
        self._stored_tokens[layer] = tokens
        self.peak_stored_tokens = max(self.peak_stored_tokens, sum(self._stored_tokens))

    @property
    def token_bytes(self) -> int:
        """Bytes of one token position across K and V, all rows and heads."""
        return 2 * self.rows * self.heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def _held_bytes(self) -> int:
        ws = self.workspace.nbytes if self.workspace is not None else 0
        return sum(layer.nbytes for layer in self.layers) + ws

    def note_growth(self, new_bytes: int, replaced_bytes: int) -> None:
        """A layer grew into ``new_bytes``; its previous grown buffer (``replaced_bytes``, 0 for the planned one)
        is freed once the kept scales are copied, so both count at that moment and only the new one after."""
        self._grown_now += new_bytes
        self.unplanned_bytes = max(self.unplanned_bytes, self._grown_now)
        self._grown_now -= replaced_bytes

    @property
    def allocated_bytes(self) -> int:
        """The planned buffers (pool views or this batch's own) plus any buffer grown beyond the plan."""
        return self.planned_bytes + self.unplanned_bytes

    @property
    def peak_stored_bytes(self) -> int:
        return self.peak_stored_tokens * self.token_bytes

    def expansions(self) -> dict[int, int]:
        return {layer.layer: layer.state.expanded_at for layer in self.layers if layer.state.expanded_at is not None}

    def refused_expansions(self) -> list[int]:
        """Layers whose expansion was due but refused, the pool having no room for it (``growth=False``)."""
        return [layer.layer for layer in self.layers if layer.state.refused_at is not None]

    def split(self, image: int, count: int) -> KVCache:
        """The cache of images ``image .. image + count`` alone, on the same pool rows (nothing is copied).

        Rows are laid out per image (2i conditional, 2i + 1 unconditional), so any run of images is a
        contiguous run of rows whose kept scales sit where they are. Every layer's bookkeeping is copied."""
        if not 0 <= image < image + count <= self.rows // 2:
            raise ValueError(f"images {image}..{image + count} are not in this cache of {self.rows // 2}")
        part = KVCache(self.policy, self.patch_nums, self.pool, 2 * count, row_offset=self.row_offset + 2 * image,
                       observer=self.observer, growth=self.allow_growth)
        part.scale = self.scale
        for mine, theirs in zip(part.layers, self.layers, strict=True):
            mine.segments, mine.length = list(theirs.segments), theirs.length
            mine.state = copy.deepcopy(theirs.state)
        part._stored_tokens = list(self._stored_tokens)
        part.peak_stored_tokens = self.peak_stored_tokens
        part.kept_after_scale = [list(map(list, kept)) for kept in self.kept_after_scale]
        return part

    def unplanned_expansions(self) -> list[int]:
        """Layers that expanded although the allocation plan (a profile's flags) did not reserve it."""
        return [layer for layer in self.expansions() if not self.policy.is_planned(layer)]
