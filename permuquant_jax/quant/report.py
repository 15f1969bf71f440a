"""The PermuQuant report: per site (and per layer of a stacked site) each candidate's error, the choice,
accepted or not; JSON round trip and a markdown table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class SiteReport:
    """The decision at one site for one layer (`layer` is the stack index, () for unstacked)."""

    site: str
    kind: str
    layer: tuple[int, ...]
    consumers: list[str]
    candidates: list[dict[str, Any]]  # {"label": str, "error": float} (sum over consumers of rel. error)
    chosen: str
    accepted: bool
    gain: float  # (E_identity - E_best) / E_identity of the best candidate (kept or not)

    @property
    def name(self) -> str:
        return self.site + ("" if not self.layer else "[" + ",".join(map(str, self.layer)) + "]")

    @property
    def error_identity(self) -> float:
        return float(self.candidates[0]["error"])

    @property
    def error_chosen(self) -> float:
        return float(next(c["error"] for c in self.candidates if c["label"] == self.chosen))


@dataclass
class QuantReport:
    """What `quantize_model` did: method, format, settings and one `SiteReport` per site and layer."""

    method: str
    format: str
    config: dict[str, Any]
    sites: list[SiteReport] = field(default_factory=list)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # per quantized linear: settings
    permutations: dict[str, list] = field(default_factory=dict)  # folded site orders, [*stack, size]
    gather_indices: dict[str, list] = field(default_factory=dict)  # norm GatherIndex path -> shape

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def n_accepted(self) -> int:
        return sum(s.accepted for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s in d["sites"]:
            s["layer"] = list(s["layer"])
        d["summary"] = {"sites": self.n_sites, "accepted": self.n_accepted}
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantReport:
        sites = [SiteReport(**{**s, "layer": tuple(s["layer"])}) for s in d.get("sites", [])]
        return cls(method=d["method"], format=d["format"], config=d.get("config", {}), sites=sites,
                   layers=d.get("layers", {}), permutations=d.get("permutations", {}),
                   gather_indices=d.get("gather_indices", {}))

    def arrays(self) -> dict[str, np.ndarray]:
        """Folded permutations as int32 arrays (`perm/<site>`) and static activation global scales
        (`act_global_scale/<linear path>`), e.g. for an .npz beside a checkpoint."""
        out = {f"perm/{k}": np.asarray(v, np.int32) for k, v in self.permutations.items()}
        for path, d in self.layers.items():
            if d.get("act_global_scale") is not None:
                out[f"act_global_scale/{path}"] = np.asarray(d["act_global_scale"], np.float32)
        return out

    @classmethod
    def from_json(cls, text: str) -> QuantReport:
        return cls.from_dict(json.loads(text))

    def to_markdown(self) -> str:
        """A markdown summary and one table row per site and layer."""
        lines = [
            f"# PermuQuant report: method `{self.method}`, format `{self.format}`",
            "",
            f"Sites (x layers): {self.n_sites}; accepted: {self.n_accepted}.",
            "",
            "| site | kind | consumers | identity error | chosen | chosen error | gain | accepted |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in self.sites:
            lines.append(
                f"| {s.name} | {s.kind} | {', '.join(s.consumers)} | {s.error_identity:.4g} | {s.chosen} | "
                f"{s.error_chosen:.4g} | {100 * s.gain:.1f}% | {'yes' if s.accepted else 'no'} |"
            )
        lines += ["", "Candidate errors (sum over consumers of the relative output error):", ""]
        for s in self.sites:
            cands = ", ".join(f"{c['label']}: {c['error']:.4g}" for c in s.candidates)
            lines.append(f"- {s.name}: {cands}")
        return "\n".join(lines) + "\n"

    def save(self, stem: str) -> None:
        """Write `<stem>.json` and `<stem>.md`."""
        with open(stem + ".json", "w") as f:
            f.write(self.to_json())
        with open(stem + ".md", "w") as f:
            f.write(self.to_markdown())
