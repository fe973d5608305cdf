"""The KV-cache manager: owns the memory budget, the preallocated KV pool and the batch cap.

In the manner of vLLM's KV manager, one object answers "how many images fit now?" and runs batches in
memory it allocated once:

- **Budget.** On CUDA: the device's free memory plus the blocks our caching allocator holds but no tensor
  uses (reusable, though not "free"), times ``gpu_mem_fraction``, less the fixed activation reserve and the
  decoder's reserve measured at warm-up (``measure_activations``). On the CPU: the configured KV budget.
- **Pool.** At warm-up the manager allocates K/V buffers once, for the largest admissible batch (KV plus
  the per-image activations measured at warm-up), and every batch then uses views of them.
- **Slots.** The pool holds ``pool_images`` image slots. The scheduler (``amskv.scheduler``) gets slots for
  the images it admits with ``allocate(n)`` (contiguous runs, first fit; fewer than n when fewer are free)
  and gives them back with ``release``. A slot holds an image's KV at the plan's peak, so an admitted
  image always completes. ``free_images()`` is the admission room: 0 means no room, a value.
- **Admission (whole batches).** ``admissible()`` returns how many images one ``generate`` call may run now:
  the pool's images, the OOM cap, and on CUDA the activations that today's free memory holds. Online AMS-KV
  growth beyond the pool gets what the budget leaves (``KVPool.growth``); an expansion that does not fit is
  refused, as in the slots, and counted (``refused_expansions``).
- **OOM cap.** ``note_oom(images)`` halves the cap (images per engine call or step) below the failing size;
  after ``recover_after`` consecutive successful calls or steps the cap doubles again, up to the pool's size.
- **State.** ``state()`` is plain data (budget, reserved, used, bytes per image, cap, ...); the server turns
  it into metrics. Only this module and the engine touch the device.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from amskv.config import MAX_IMAGES, VARConfig
from amskv.device import cuda_free_bytes, cuda_peak, release_cached_blocks
from amskv.kvcache.storage import GrowthAllowance, KVPool
from amskv.memory import max_batch
from amskv.sampling import SamplingParams

logger = logging.getLogger(__name__)


class TokenRun(Protocol):
    """What token generation reports that the manager reads (``amskv.generate.TokenResult``)."""

    @property
    def kv_allocated_bytes(self) -> int: ...


class CallResult(TokenRun, Protocol):
    """What a whole engine call reports that the manager reads (``amskv.engine.GenerationResult``)."""

    @property
    def unplanned_expansions(self) -> list[int]: ...


Tokens = TypeVar("Tokens", bound=TokenRun)
OnPreview = Callable[[int, list[int], torch.Tensor], None]  # (scale, rows, uint8 images): amskv.engine's


class PoolEngine(Protocol[Tokens]):
    """What the KV manager needs of an engine (``amskv.engine.Engine``): its plan's bytes, a pool, and calls to
    run and to measure. Generic in what token generation returns, which only goes back to ``decode``."""

    @property
    def device(self) -> torch.device: ...

    @property
    def config(self) -> VARConfig: ...

    def kv_bytes_per_image(self) -> int: ...

    def new_pool(self, images: int) -> KVPool: ...

    def generate(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[SamplingParams],
                 pool: KVPool | None = None, previews: Sequence[Collection[int]] | None = None,
                 on_preview: OnPreview | None = None) -> CallResult: ...

    def generate_tokens(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[SamplingParams]) \
            -> Tokens: ...

    def decode(self, res: Tokens) -> torch.Tensor: ...


@dataclass(frozen=True)
class KVState:
    device: str
    budget_bytes: int  # what KV (and, on CUDA, the activations) may use now, the pool included
    reserved_bytes: int  # the KV pool, allocated once
    used_bytes: int  # KV of the slots running images hold (and a whole-batch call's images); 0 when idle
    bytes_per_image: int  # KV bytes of one image under the policy's plan
    activation_reserve_bytes: int  # fixed part of the activation peak (CUDA; 0 on the CPU)
    activation_bytes_per_image: int  # per-image part of the activation peak (CUDA; 0 on the CPU)
    decode_reserve_bytes: int  # the decoder's peak, one fixed-size chunk (CUDA; 0 on the CPU)
    pool_images: int  # the largest batch the pool holds
    cap: int  # the batch cap after OOM back-off (pool_images when no OOM is pending)
    admissible: int  # images that fit now (0 = no room)
    unplanned_expansions: int  # online AMS-KV layer expansions beyond the profile, since start
    refused_expansions: int  # such expansions refused in whole-batch calls for want of room, since start


# A peak meter: a context manager whose one-item list holds, on exit, the allocator's peak above the bytes
# allocated on entry (amskv.device.cuda_peak on CUDA; amskv.device.profiled_peak, torch.profiler, anywhere).
PeakMeter = Callable[[], AbstractContextManager[list[int]]]


@dataclass(frozen=True)
class ActivationPeaks:
    """Activation memory of one engine call, KV excluded: token generation ``fixed + per_image * images``;
    the decoder ``decode`` whatever the batch (it runs ``decode_chunk`` images per call)."""

    fixed: int
    per_image: int
    decode: int


def measure_activations(engine: PoolEngine[Tokens], params: SamplingParams, meter: PeakMeter) -> ActivationPeaks:
    """Measure token generation at 1 and 2 images and the decoder apart, each under ``meter``.

    The decoder pads every call to ``decode_chunk`` images (8 on CUDA), so a whole ``generate``'s peak is the
    decoder's at 1 image as at 2, and their difference says nothing of what an image costs; measured apart,
    the generation gives the per-image figure and the decoder a constant. The token generation allocates its
    own KV cache, which its result reports and which is taken off (the KV is budgeted as KV)."""
    def generation(images: int) -> tuple[int, Tokens]:
        labels = list(range(images))
        with meter() as peak:
            result = engine.generate_tokens(labels, labels, [params] * images)
        return max(0, peak[0] - int(result.kv_allocated_bytes)), result

    one, result = generation(1)
    two, _ = generation(2)
    with meter() as peak:
        engine.decode(result)
    per_image = max(0, two - one)
    return ActivationPeaks(fixed=max(0, one - per_image), per_image=per_image, decode=peak[0])


class KVCacheManager(Generic[Tokens]):
    def __init__(self, engine: PoolEngine[Tokens], *, max_batch: int = MAX_IMAGES, cpu_budget_bytes: int = 2**30,
                 gpu_mem_fraction: float = 0.9, recover_after: int = 8) -> None:
        if not 1 <= max_batch <= MAX_IMAGES or recover_after < 1 or not 0 < gpu_mem_fraction <= 1:
            raise ValueError(f"need 1 <= max_batch <= {MAX_IMAGES}, recover_after >= 1 and 0 < gpu_mem_fraction <= 1")
        self.engine = engine
        self.device: torch.device = engine.device
        self.max_batch, self.cpu_budget_bytes = max_batch, cpu_budget_bytes
        self.gpu_mem_fraction, self.recover_after = gpu_mem_fraction, recover_after
        self.bytes_per_image = engine.kv_bytes_per_image()
        self.peak_step_tokens = 2 * engine.config.scale_tokens[-1]  # one image's largest step: its last scale
        self.activation_reserve = 0
        self.activation_per_image = 0
        self.decode_reserve = 0
        self.pool: KVPool | None = None
        self.pool_images = 0
        self.cap = 0
        self._successes = 0
        self._batch_images = 0  # images of the whole-batch call running now (``generate``)
        self.unplanned_expansions = 0
        self.refused_expansions = 0
        self._free_runs: list[tuple[int, int]] = []  # (first slot, count), sorted, never adjacent

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    # --- warm-up ------------------------------------------------------------------------------------
    def warm_up(self, params: SamplingParams) -> None:
        """First-call allocations and kernels; on CUDA measure the activations (``measure_activations``: token
        generation at 1 and 2 images, extrapolated linearly, and the decoder apart). Then allocate the pool for
        the largest admissible batch. Raises ValueError when the budget holds no image."""
        self.engine.generate([0], [0], [params])
        if self.on_cuda:
            peaks = measure_activations(self.engine, params, lambda: cuda_peak(self.device))
            self.activation_reserve, self.activation_per_image = peaks.fixed, peaks.per_image
            self.decode_reserve = peaks.decode
        budget = self._free_budget()
        per_image = self.bytes_per_image + self.activation_per_image
        images = max_batch(budget, per_image, self.max_batch)
        if images < 1:
            raise ValueError(
                f"the KV budget ({budget} bytes) holds no image ({self.bytes_per_image} bytes of KV each"
                f"{f' plus {self.activation_per_image} of activations' if self.activation_per_image else ''}); "
                "raise AMSKV_KV_BUDGET_GIB or AMSKV_GPU_MEM_FRACTION")
        self.pool = pool = self.engine.new_pool(images)
        pool.growth = GrowthAllowance(room_bytes=0)  # the pool is the budget's: growth only by generate
        self.pool_images = self.cap = images
        self._free_runs = [(0, images)]
        logger.info("KV pool: %d images, %.2f MiB (%.3f MiB per image); activation reserve %.1f MiB + %.2f MiB "
                    "per image, decoder %.1f MiB", images, pool.nbytes / 2**20, self.bytes_per_image / 2**20,
                    self.activation_reserve / 2**20, self.activation_per_image / 2**20, self.decode_reserve / 2**20)

    def _free_budget(self) -> int:
        """Bytes available beyond what is allocated now (the pool, once it exists, is allocated)."""
        if not self.on_cuda:
            return self.cpu_budget_bytes - (self.pool.nbytes if self.pool is not None else 0)
        # the decoder runs in the same step as the generation (a finished cohort), so both reserves are held
        reserve = self.activation_reserve + self.decode_reserve
        return max(0, int(cuda_free_bytes(self.device) * self.gpu_mem_fraction) - reserve)

    def _growth_room(self, images: int) -> int:
        """Bytes a whole-batch call of ``images`` images may grow beyond the pool: what the budget leaves (on
        CUDA after the call's activations)."""
        return max(0, self._free_budget() - (self.activation_per_image * images if self.on_cuda else 0))

    # --- admission ----------------------------------------------------------------------------------
    def admissible(self) -> int:
        """Images that fit now: 0 before warm-up or when the device cannot hold one image's activations."""
        if self.pool is None:
            return 0
        fits = min(self.pool_images, self.cap)
        if self.on_cuda and self.activation_per_image:
            fits = min(fits, self._free_budget() // self.activation_per_image)
        return max(0, fits)

    # --- slots (the scheduler) -----------------------------------------------------------------
    def _held_slots(self) -> int:
        return self.pool_images - sum(count for _, count in self._free_runs)

    def free_images(self) -> int:
        """Free image slots (0 before warm-up, or when every slot is taken), limited on CUDA by the
        activations that today's free memory holds for one more image."""
        held = self._held_slots()
        free = self.pool_images - held
        if self.on_cuda and self.activation_per_image and free:
            free = min(free, max(0, self._free_budget() // self.activation_per_image - held))
        return free

    def step_token_cap(self) -> int | None:
        """The most sequence tokens one step may run (its activations), None when unbounded (the CPU).

        On CUDA the per-image activation peak measured at warm-up is one image's largest step (its last scale,
        both CFG rows), so a token of any step is priced at that peak over those tokens, and today's free
        memory (less the pool, which is allocated) buys that many tokens."""
        if not (self.on_cuda and self.activation_per_image):
            return None
        per_token = max(1, self.activation_per_image // self.peak_step_tokens)
        return max(self.peak_step_tokens, self._free_budget() // per_token)

    def allocate(self, images: int) -> list[tuple[int, int]]:
        """Up to ``images`` free slots as (first slot, count) runs, first fit; [] when none is free."""
        runs, left = [], min(images, self.free_images())
        while left > 0 and self._free_runs:
            first, count = self._free_runs[0]
            take = min(count, left)
            runs.append((first, take))
            self._free_runs[0:1] = [(first + take, count - take)] if take < count else []
            left -= take
        return runs

    def release(self, first: int, count: int) -> None:
        """Give slots ``first .. first + count`` back (an image finished, failed or was cancelled)."""
        if count <= 0:
            return
        runs = sorted(self._free_runs + [(first, count)])
        merged: list[tuple[int, int]] = []
        for start, n in runs:
            if merged and merged[-1][0] + merged[-1][1] > start:
                raise ValueError(f"slots {first}..{first + count} released twice")
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((start, n))
        if merged and merged[-1][0] + merged[-1][1] > self.pool_images:
            raise ValueError(f"slots {first}..{first + count} are not in the pool of {self.pool_images}")
        self._free_runs = merged

    def note_success(self) -> None:
        """A call or step ran without running out of memory: after ``recover_after`` of them the cap doubles."""
        self._successes += 1
        if self._successes >= self.recover_after and self.cap < self.pool_images:
            self.cap = min(self.pool_images, self.cap * 2)
            self._successes = 0
            logger.info("raised the images per step to %d after %d successful steps", self.cap, self.recover_after)

    def generate(self, labels: Sequence[int], seeds: Sequence[int], params: Sequence[SamplingParams],
                 previews: Sequence[Collection[int]] | None = None, on_preview: OnPreview | None = None) -> CallResult:
        """Run one engine call in the pool. Raises torch.OutOfMemoryError (see ``note_oom``) or ValueError
        when more images are given than the pool holds. ``previews``/``on_preview``: the engine's."""
        if self.pool is None or len(labels) > self.pool_images:
            raise ValueError(f"{len(labels)} images exceed the KV pool ({self.pool_images} images)")
        self._batch_images = len(labels)
        growth = self.pool.growth = GrowthAllowance(self._growth_room(len(labels)))
        try:
            result = self.engine.generate(list(labels), list(seeds), list(params), pool=self.pool,
                                          previews=previews, on_preview=on_preview)
        finally:
            self._batch_images = 0
            self.pool.growth = GrowthAllowance(room_bytes=0)  # the room was this call's; outside one, none
            self.refused_expansions += len(growth.refused_layers)
        self.unplanned_expansions += len(result.unplanned_expansions)
        self.note_success()
        return result

    def note_oom(self, images: int) -> int:
        """An engine call of ``images`` images ran out of memory: cap later calls below it. Returns the cap."""
        self._successes = 0
        self.cap = max(1, min(self.cap, math.ceil(images / 2)))
        release_cached_blocks(self.device)  # give the failed call's blocks back before the retry
        return self.cap

    # --- reporting ----------------------------------------------------------------------------------
    def state(self) -> KVState:
        reserved = self.pool.nbytes if self.pool is not None else 0
        return KVState(
            device=str(self.device),
            budget_bytes=reserved + self._free_budget() if self.on_cuda else self.cpu_budget_bytes,
            reserved_bytes=reserved, used_bytes=self.bytes_per_image * (self._held_slots() + self._batch_images),
            bytes_per_image=self.bytes_per_image,
            activation_reserve_bytes=self.activation_reserve, activation_bytes_per_image=self.activation_per_image,
            decode_reserve_bytes=self.decode_reserve, pool_images=self.pool_images, cap=self.cap,
            admissible=self.admissible(), unplanned_expansions=self.unplanned_expansions,
            refused_expansions=self.refused_expansions)

