"""The calibration profile that `amskv analyze --calibrate` writes and `amskv-static` reads.

JSON, format ``amskv-profile/1``::

    {"format": "amskv-profile/1", "model": "var-d30", "depth": 30,
     "theta": 0.71, "target_fraction": 0.2 | null, "fraction": 0.2,
     "demanding": [true, false, ...],              # one flag per layer
     "layer_similarity": [0.63, 0.88, ...],        # the value compared with theta, per layer
     "similarity": {"0": {"1": 0.41, ...}, ...},   # layer -> scale -> mean inter-scale key similarity
     "test_scales": [6, 7], "policy": {...}, "samples": 32,
     "measure": "cosine", "layer_similarity_neg_l2": [-0.9, ...], "seconds": 1.2}

Only ``format`` and ``demanding`` are needed to build a policy; the rest documents how the flags arose.
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
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<profile>") -> "CalibrationProfile":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{source} is not an amskv calibration profile (format {FORMAT})")
        flags = data.get("demanding")
        if not isinstance(flags, list) or not all(isinstance(x, bool) or x in (0, 1) for x in flags):
            raise ValueError(f"{source}: 'demanding' must be a list of booleans, one per layer")
        flags = [bool(x) for x in flags]
        depth = data.get("depth")
        if depth is not None and depth != len(flags):
            raise ValueError(f"{source}: depth {depth} but {len(flags)} 'demanding' flags")
        similarity = {int(layer): {int(si): float(v) for si, v in by_scale.items()}
                      for layer, by_scale in (data.get("similarity") or {}).items()}
        return cls(
            demanding=tuple(flags), model=str(data.get("model", "")), theta=data.get("theta"),
            target_fraction=data.get("target_fraction"), similarity=similarity,
            layer_similarity=tuple(float(v) for v in data.get("layer_similarity") or ()),
            test_scales=tuple(int(s) for s in data.get("test_scales") or ()),
            policy=dict(data.get("policy") or {}), samples=int(data.get("samples") or 0),
            layer_similarity_neg_l2=tuple(float(v) for v in data.get("layer_similarity_neg_l2") or ()),
            seconds=float(data.get("seconds") or 0.0), measure=str(data.get("measure") or "cosine"),
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


def load_profile(path) -> tuple[bool, ...]:
    """Per-layer demand flags of a profile (what ``amskv-static`` needs)."""
    return read_profile(path).demanding


def check_profile_depth(policy, policy_args: dict, depth: int) -> None:
    """A profile made for another depth would silently misclassify layers: refuse it."""
    flags = getattr(policy, "demanding", None)
    if flags is not None and ("profile" in policy_args or "demanding" in policy_args) and len(flags) != depth:
        raise ValueError(f"the calibration profile has {len(flags)} layers but the model has {depth}")
