"""KV cache policies: each decides, after a layer has attended at a scale, what that layer keeps.

Policies only decide; ``amskv.kvcache.storage`` stores. A policy works on scale indices and token counts,
so the same code drives a real generation and the memory arithmetic (``amskv.memory``), which is what
makes the predicted bytes equal the bytes held.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from amskv.kvcache.profile import CalibrationProfile, read_profile

Similarity = Callable[[], float]  # lazily computed inter-scale key similarity of one layer
CanExpand = bool | Callable[[], bool]  # whether a due expansion has room; a callable is asked only when due


@dataclass
class LayerState:
    """What one layer holds: scale indices oldest first, its token budget, and whether it expanded."""

    kept: list[int] = field(default_factory=list)
    budget: int = 0
    expanded_at: int | None = None  # scale at which the budget grew to C_max
    refused_at: int | None = None  # scale at which an expansion was due but the allocation had no room for it


@dataclass(frozen=True)
class Decision:
    keep: bool  # store the scale just attended
    evict: tuple[int, ...] = ()  # scales to drop, oldest first


class KVPolicy:
    """Base policy. ``decide`` may mutate the layer state and returns what the storage must do."""

    name = "base"
    # a calibration profile's flags that the allocation plan reserved expansions for (OnlineAMSKVPolicy);
    # None: the plan is the policy's own, and nothing can grow beyond it
    planned: tuple[bool, ...] | None = None

    def init_layer(self, layer: int) -> LayerState:
        return LayerState()

    def is_planned(self, layer: int) -> bool:
        """Whether the allocation reserved this layer's expansion (always, without a profile)."""
        if self.planned is None:  # static flags, or the worst case: every expansion is planned for
            return True
        return layer < len(self.planned) and self.planned[layer]

    def decide(self, state: LayerState, layer: int, si: int, scale_tokens: tuple[int, ...],
               similarity: Similarity, can_expand: CanExpand = True) -> Decision:
        """``can_expand`` False: the storage has no room for this layer to grow, so a due expansion is refused
        (recorded in ``state.refused_at``) and the layer keeps its budget: "no room" is a value. A callable is
        asked only when an expansion is due (the storage reserves the room when it answers True)."""
        raise NotImplementedError

    def params(self) -> dict:
        return {}

    def plan_oracle(self):
        """The similarity oracle the memory plan replays (None: the worst case, every layer demanding)."""
        return None

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name

    @staticmethod
    def _is_last(si: int, scale_tokens: tuple[int, ...]) -> bool:
        return si == len(scale_tokens) - 1


class VanillaPolicy(KVPolicy):
    """The original VAR: every scale is stored, the last one too (although nothing reads it)."""

    name = "vanilla"

    def decide(self, state, layer, si, scale_tokens, similarity, can_expand=True):
        state.kept.append(si)
        return Decision(keep=True)


class FullPolicy(KVPolicy):
    """Every scale but the last: identical attention to vanilla, 37.6% less at 256 px."""

    name = "full"

    def decide(self, state, layer, si, scale_tokens, similarity, can_expand=True):
        if self._is_last(si, scale_tokens):
            return Decision(keep=False)
        state.kept.append(si)
        return Decision(keep=True)


class SinkWindowPolicy(KVPolicy):
    """The first ``sink`` scales (locked) plus the last ``window`` scales. ``sink=0`` is a sliding window."""

    def __init__(self, window: int = 2, sink: int = 0):
        if window < 0 or sink < 0:
            raise ValueError("window and sink must be >= 0")
        self.window, self.sink = window, sink
        self.name = "sink" if sink else "window"

    def params(self):
        return {"window": self.window, "sink": self.sink} if self.sink else {"window": self.window}

    def decide(self, state, layer, si, scale_tokens, similarity, can_expand=True):
        if self._is_last(si, scale_tokens):
            return Decision(keep=False)
        state.kept.append(si)
        unlocked = [s for s in state.kept if s >= self.sink]
        evict = tuple(unlocked[: max(0, len(unlocked) - self.window)])
        state.kept = [s for s in state.kept if s not in evict]
        return Decision(keep=si in state.kept, evict=tuple(s for s in evict if s != si))


class AMSKVPolicy(KVPolicy):
    """AMS-KV (the AMS-KV paper, AAAI 2026; docs/kv-cache.md §1), the rules both forms share:

    - the first ``c_cds`` scales are condensed and locked;
    - each layer starts with a budget of ``c_min`` tokens;
    - on overflow, a cache-demanding layer grows once to ``c_max`` (which layers are demanding is what the two
      forms differ in: ``OnlineAMSKVPolicy`` tests key similarity against ``theta`` at run time,
      ``StaticAMSKVPolicy`` reads per-layer flags from a calibration profile);
    - otherwise the oldest unlocked scale is evicted (CLRU);
    - a scale with more than ``c_max`` tokens is not cached, nor is the last scale;
    - the scale just inserted is never evicted unless ``evict_newest`` (a variant; docs/kv-cache.md §1).
    """

    demanding: tuple[bool, ...] | None = None  # static flags (StaticAMSKVPolicy); None online

    def __init__(self, c_cds: int = 2, c_min: int = 174, c_max: int = 274, theta: float = 0.8,
                 evict_newest: bool = False):
        if c_cds < 0 or c_min < 0 or c_max < c_min:
            raise ValueError(f"need c_cds >= 0 and 0 <= c_min <= c_max (got {c_cds}, {c_min}, {c_max})")
        self.c_cds, self.c_min, self.c_max, self.theta = c_cds, c_min, c_max, theta
        self.evict_newest = evict_newest

    def params(self) -> dict:
        p: dict[str, object] = {"c_cds": self.c_cds, "c_min": self.c_min, "c_max": self.c_max}
        p.update(self._form_params())
        if self.evict_newest:
            p["evict_newest"] = True
        if self.planned is not None:
            p["planned_layers"] = [i for i, d in enumerate(self.planned) if d]
        return p

    def _form_params(self) -> dict[str, object]:
        raise NotImplementedError

    def init_layer(self, layer: int) -> LayerState:
        return LayerState(budget=self.c_min)

    def is_demanding(self, layer: int, similarity: Similarity) -> bool:
        raise NotImplementedError

    def decide(self, state, layer, si, scale_tokens, similarity, can_expand=True):
        if self._is_last(si, scale_tokens) or scale_tokens[si] > self.c_max:
            return Decision(keep=False)  # skip rule: nothing is inserted, nothing is evicted
        state.kept.append(si)
        size = sum(scale_tokens[s] for s in state.kept)
        evicted: list[int] = []
        tested = False  # the similarity is asked at most once per scale: it cannot change while evicting
        while size > state.budget:
            if state.expanded_at is None and state.budget < self.c_max and not tested:
                tested = True
                if self.is_demanding(layer, similarity):
                    if can_expand if isinstance(can_expand, bool) else can_expand():
                        state.budget, state.expanded_at = self.c_max, si
                        continue
                    state.refused_at = si
            victims = [s for s in state.kept if s >= self.c_cds and (s != si or self.evict_newest)]
            if not victims:
                break  # only locked scales and the newest remain: they stay over budget
            state.kept.remove(victims[0])
            evicted.append(victims[0])
            size -= scale_tokens[victims[0]]
        return Decision(keep=si in state.kept, evict=tuple(s for s in evicted if s != si))


class OnlineAMSKVPolicy(AMSKVPolicy):
    """AMS-KV as the paper runs it: at a layer's first overflow, its keys' similarity to the previous scale's
    (``kvcache.similarity``) below ``theta`` makes it cache-demanding.

    ``planned``: a calibration profile's flags. The allocation is planned for them, and an online expansion of a
    layer the profile did not flag is an exception the storage grows for on the spot, within the budget
    (docs/kv-cache.md §2), instead of a worst case reserved for every layer.
    """

    name = "amskv"

    def __init__(self, c_cds: int = 2, c_min: int = 174, c_max: int = 274, theta: float = 0.8,
                 evict_newest: bool = False, planned: tuple[bool, ...] | None = None):
        super().__init__(c_cds, c_min, c_max, theta, evict_newest)
        self.planned = None if planned is None else tuple(bool(p) for p in planned)

    def _form_params(self) -> dict[str, object]:
        return {"theta": self.theta}

    def plan_oracle(self):
        if self.planned is None:
            return None
        planned = self.planned
        return lambda layer, si: -math.inf if layer < len(planned) and planned[layer] else math.inf

    def is_demanding(self, layer: int, similarity: Similarity) -> bool:
        return similarity() < self.theta


class StaticAMSKVPolicy(AMSKVPolicy):
    """AMS-KV with the cache-demanding layers fixed by per-layer flags (a calibration profile's): no similarity
    is measured at run time, so an image does not depend on its batch mates and its KV is known before it runs."""

    name = "amskv-static"

    def __init__(self, demanding: tuple[bool, ...], c_cds: int = 2, c_min: int = 174, c_max: int = 274,
                 theta: float = 0.8, evict_newest: bool = False):
        super().__init__(c_cds, c_min, c_max, theta, evict_newest)
        self.demanding = tuple(bool(d) for d in demanding)

    def _form_params(self) -> dict[str, object]:
        flags = self.demanding or ()
        return {"demanding_layers": "all" if all(flags) else [i for i, d in enumerate(flags) if d]}

    def is_demanding(self, layer: int, similarity: Similarity) -> bool:
        flags = self.demanding or ()
        return layer < len(flags) and flags[layer]


# Named parameter sets, chosen by quality on the 680-token mnist64 model (docs/mnist64-sweep.md), and written
# in scales so that one choice carries to every released layout (the transfer rule, docs/kv-cache.md §4):
#   c_cds      condensed scales, locked (1x1 and 2x2: 5 tokens);
#   local_min  how many of the scales just before the last one an efficient layer's budget holds;
#   local_max  the same for a cache-demanding layer.
# c_min = tokens(condensed) + tokens(the local_min scales before the last); c_max likewise with local_max.
# At 256 px that is 5 + 169 = 174 and 5 + 169 + 100 = 274; at 512 px 5 + 576 = 581 and 581 + 324 = 905.
PRESET_RULES: dict[str, dict] = {
    "default": {"c_cds": 2, "local_min": 1, "local_max": 2},
    "aggressive": {"c_cds": 2, "local_min": 1, "local_max": 1},
}
# The 155-token demo layout keeps the token budgets chosen from its own table (docs/demo-model.md).
DEMO_PRESETS: dict[str, dict] = {
    "default": {"c_cds": 2, "c_min": 30, "c_max": 55, "theta": 0.45},
    "aggressive": {"c_cds": 2, "c_min": 30, "c_max": 30, "theta": 0.45},
}
PATCH_NUMS_BY_LAYOUT = {"256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}


def preset_budgets(rule: dict, patch_nums: tuple[int, ...]) -> dict:
    """Token budgets of a scale-unit preset on one layout (see PRESET_RULES)."""
    tokens = [pn * pn for pn in patch_nums]
    condensed = sum(tokens[:rule["c_cds"]])

    def local(k: int) -> int:  # condensed + the k scales just before the last one
        return condensed + sum(tokens[len(tokens) - 1 - k:len(tokens) - 1])

    budgets = {"c_cds": rule["c_cds"], "c_min": local(rule["local_min"]), "c_max": local(rule["local_max"])}
    return budgets | {k: v for k, v in rule.items() if k not in ("c_cds", "local_min", "local_max")}


# preset -> layout ("256", "512", "demo") -> AMSKVPolicy parameters
AMSKV_PRESETS: dict[str, dict[str, dict]] = {
    name: {**{layout: preset_budgets(rule, pns) for layout, pns in PATCH_NUMS_BY_LAYOUT.items()},
           "demo": DEMO_PRESETS[name]}
    for name, rule in PRESET_RULES.items()
}
POLICY_NAMES = ("vanilla", "full", "window", "sink", "amskv", "amskv-static")
# The policy the CLI commands and the server use unless told otherwise: batch-invariant (an image does not
# depend on its batch mates) and its memory is known before a batch starts.
DEFAULT_POLICY = "amskv-static"


def layout_key(patch_nums: tuple[int, ...]) -> str:
    last = patch_nums[-1]
    return {16: "256", 32: "512", 8: "demo"}.get(last, "256")


def make_policy(name: str, patch_nums: tuple[int, ...], args: Mapping[str, object] | None = None,
                profile: CalibrationProfile | tuple[bool, ...] | None = None) -> KVPolicy:
    """Build a policy by name from typed arguments (the CLI parses its strings first); ``preset`` picks a
    named AMS-KV set, ``profile=`` names a profile file, ``demanding=`` gives flags ("0110" or booleans).

    ``profile`` (a ``CalibrationProfile``, or per-layer flags) feeds ``amskv-static``; without one every layer
    is treated as cache-demanding, the safe upper bound. For online ``amskv`` the profile's flags only plan the
    allocation (``OnlineAMSKVPolicy.planned``); the online test still decides.
    """
    args = {k.replace("-", "_"): v for k, v in (args or {}).items()}
    if name == "vanilla":
        policy: KVPolicy = VanillaPolicy()
    elif name == "full":
        policy = FullPolicy()
    elif name == "window":
        policy = SinkWindowPolicy(window=_int(args.pop("window", 2), "window"), sink=0)
    elif name == "sink":
        sink = args.pop("sink", args.pop("c_cds", 2))
        policy = SinkWindowPolicy(window=_int(args.pop("window", 1), "window"), sink=_int(sink, "sink"))
    elif name in ("amskv", "amskv-static"):
        preset = args.pop("preset", "default")
        if not isinstance(preset, str) or preset not in AMSKV_PRESETS:
            raise ValueError(f"unknown AMS-KV preset {preset!r}; choose from {sorted(AMSKV_PRESETS)}")
        budgets = dict(AMSKV_PRESETS[preset][layout_key(tuple(patch_nums))])
        given = {k: args.pop(k) for k in list(args) if k in ("c_cds", "c_min", "c_max", "theta", "evict_newest")}
        c_cds, c_min, c_max = (_int(given.get(k, budgets[k]), k) for k in ("c_cds", "c_min", "c_max"))
        evict_newest = bool(given.get("evict_newest", False))
        if name == "amskv-static" and "profile" in args:  # a profile file (online amskv gets the profile itself)
            profile = read_profile(str(args.pop("profile")))
        flags = profile.demanding if isinstance(profile, CalibrationProfile) else profile
        if name == "amskv-static":
            given_flags = args.pop("demanding", None)
            theta = _float(given.get("theta", budgets.get("theta", 0.8)), "theta")
            demanding = _flags(given_flags) if given_flags is not None else flags
            policy = StaticAMSKVPolicy(demanding if demanding is not None else _flags("all"),  # the safe bound
                                       c_cds, c_min, c_max, theta, evict_newest)
        else:
            if "theta" in given:
                theta = _float(given["theta"], "theta")
            elif isinstance(profile, CalibrationProfile) and profile.theta is not None:
                theta = online_theta(profile)  # the layout has no measured theta: the checkpoint's
            else:
                theta = _float(budgets.get("theta", 0.8), "theta")
            policy = OnlineAMSKVPolicy(c_cds, c_min, c_max, theta, evict_newest, planned=flags)
    else:
        raise ValueError(f"unknown KV policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    if args:
        raise ValueError(f"unknown argument(s) for policy {name!r}: {sorted(args)}")
    return policy


def _int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"policy argument {name} must be an integer, got {value!r}")
    return int(value)


def _float(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"policy argument {name} must be a number, got {value!r}")
    return float(value)


def online_theta(profile: CalibrationProfile) -> float:
    """θ for the online test, fitted on what that test compares.

    The online test asks at each overflow (the profile's test scales) whether that scale's similarity is below
    θ, so a layer expands when its *lowest* value over the test scales is; the profile's own θ separates the
    *mean* over those scales, which is higher, and so lets unplanned layers expand. Here θ lies midway between
    the flagged layers' highest minimum and the unflagged layers' lowest minimum, per the profile's per-scale
    similarities (the profile's θ when it has none, or when the two groups overlap on this statistic).
    """
    if profile.theta is None:
        raise ValueError("the profile has no theta to fit the online test's threshold from")
    scales, similarity = profile.test_scales, profile.similarity
    lowest = {layer: min((by[s] for s in scales if s in by), default=None) for layer, by in similarity.items()}
    flagged = [v for layer, v in lowest.items() if v is not None and layer < len(profile.demanding)
               and profile.demanding[layer]]
    unflagged = [v for layer, v in lowest.items() if v is not None and layer < len(profile.demanding)
                 and not profile.demanding[layer]]
    if not unflagged:
        return profile.theta
    if not flagged:
        return min(unflagged) - 1e-6 if profile.theta >= min(unflagged) else profile.theta
    if max(flagged) >= min(unflagged):
        return profile.theta
    return (max(flagged) + min(unflagged)) / 2


def _flags(value: object) -> tuple[bool, ...]:
    if value == "all":
        return (True,) * 256  # more layers than any model has: every layer is demanding
    if isinstance(value, str):
        digits = value.replace(",", "").replace(" ", "")
        if not digits or set(digits) - {"0", "1"}:
            raise ValueError(f"demanding flags must be a string of 0/1 per layer, got {value!r}")
        return tuple(c == "1" for c in digits)
    if not isinstance(value, tuple | list):
        raise ValueError(f"demanding flags must be a string of 0/1 per layer or a list of booleans, got {value!r}")
    return tuple(bool(v) for v in value)
