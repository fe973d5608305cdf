"""The calibration profile that `amskv analyze --calibrate` writes and `amskv-static` reads.

JSON, format ``amskv-profile/1``::

    {"format": "amskv-profile/1", "model": "var-d30", "depth": 30,
     "theta": 0.71, "target_fraction": 0.2 | null, "fraction": 0.2,
     "demanding": [true, false, ...],              # one flag per layer
     "layer_similarity": [0.63, 0.88, ...],        # the value compared with theta, per layer
     "similarity": {"0": {"1": 0.41, ...}, ...},   # layer -> scale -> mean inter-scale key similarity
     "test_scales": [6, 7], "policy": {...}, "samples": 32,
     "measure": "cosine", "layer_similarity_neg_l2": [-0.9, ...], "seconds": 1.2,
     "time_limit_s": 60.0, "cut_short": false}

Only ``format`` and ``demanding`` are needed to build a policy; the rest documents how the flags arose. Every
field's type is checked on read: a wrong one is a ValueError naming the file and the field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT = "amskv-profile/1"


@dataclass(frozen=True)
class CalibrationProfile:
    demanding: tuple[bool, ...]
    model: str = ""
    theta: float | None = None
    target_fraction: float | None = None
    similarity: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> scale -> similarity
    layer_similarity: tuple[float, ...] = ()
    test_scales: tuple[int, ...] = ()
    policy: dict = field(default_factory=dict)  # the AMS-KV parameters the test scales came from
    samples: int = 0
    layer_similarity_neg_l2: tuple[float, ...] = ()  # the same test scales under the negative L2 measure
    seconds: float = 0.0  # how long the calibration took (0 when unknown)
    measure: str = "cosine"  # the measure of layer_similarity and theta
    time_limit_s: float | None = None  # the calibration's time bound (None when unknown)
    cut_short: bool = False  # the time bound stopped it before all its images were generated

    @property
    def depth(self) -> int:
        return len(self.demanding)

    @property
    def fraction(self) -> float:
        return sum(self.demanding) / self.depth if self.demanding else 0.0

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "model": self.model, "depth": self.depth, "theta": self.theta,
            "target_fraction": self.target_fraction, "fraction": self.fraction,
            "demanding": list(self.demanding), "layer_similarity": list(self.layer_similarity),
            "similarity": {str(layer): {str(si): v for si, v in sorted(by_scale.items())}
                           for layer, by_scale in sorted(self.similarity.items())},
            "test_scales": list(self.test_scales), "policy": dict(self.policy), "samples": self.samples,
            "measure": self.measure, "layer_similarity_neg_l2": list(self.layer_similarity_neg_l2),
            "seconds": self.seconds, "time_limit_s": self.time_limit_s, "cut_short": self.cut_short,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<profile>") -> CalibrationProfile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not an amskv calibration profile (format {FORMAT})")
        flags = data.get("demanding")
        if not isinstance(flags, list) or not all(isinstance(x, bool) or x in (0, 1) for x in flags):
            raise ValueError(f"{source}: 'demanding' must be a list of booleans, one per layer")
        flags = [bool(x) for x in flags]
        depth = data.get("depth")
        if depth is not None and depth != len(flags):
            raise ValueError(f"{source}: depth {depth} but {len(flags)} 'demanding' flags")
        def field_of(name: str, convert, shape: str):
            """``convert(value)`` of a field; any type error names the file, the field and its shape."""
            try:
                return convert(data.get(name))
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"{source}: field '{name}' must be {shape}, got {data.get(name)!r:.80}") from None

        def number(v):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(v)
            return float(v)

        def numbers(v):
            return tuple(number(x) for x in (v or ()))

        def flag(v):
            if v is not None and not isinstance(v, bool):
                raise TypeError(v)
            return bool(v)

        def optional(v):
            return None if v is None else number(v)
        return cls(
            demanding=tuple(flags), model=str(data.get("model", "")),
            theta=field_of("theta", optional, "a number or null"),
            target_fraction=field_of("target_fraction", optional, "a number or null"),
            similarity=field_of("similarity", lambda v: {int(layer): {int(si): number(x) for si, x in by.items()}
                                                         for layer, by in (v or {}).items()},
                                "{layer: {scale: number}}"),
            layer_similarity=field_of("layer_similarity", numbers, "a list of numbers, one per layer"),
            test_scales=field_of("test_scales", lambda v: tuple(int(s) for s in (v or ())), "a list of scale indices"),
            policy=field_of("policy", lambda v: dict(v or {}), "an object"),
            samples=field_of("samples", lambda v: int(v or 0), "an integer"),
            layer_similarity_neg_l2=field_of("layer_similarity_neg_l2", numbers, "a list of numbers, one per layer"),
            seconds=field_of("seconds", lambda v: number(v or 0.0), "a number"),
            measure=str(data.get("measure") or "cosine"),
            time_limit_s=field_of("time_limit_s", optional, "a number or null"),
            cut_short=field_of("cut_short", flag, "true or false"),
        )


def write_profile(path: str | Path, profile: CalibrationProfile) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    return path


def read_profile(path: str | Path) -> CalibrationProfile:
    path = Path(str(path))
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"calibration profile {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"calibration profile {path} is not JSON: {exc}") from None
    return CalibrationProfile.from_dict(data, str(path))


def check_profile_depth(policy, policy_args: dict, depth: int) -> None:
    """A profile made for another depth would silently misclassify layers: refuse it."""
    flags = getattr(policy, "demanding", None)
    if flags is not None and ("profile" in policy_args or "demanding" in policy_args) and len(flags) != depth:
        raise ValueError(f"the calibration profile has {len(flags)} layers but the model has {depth}")
