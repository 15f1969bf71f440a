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
    # {"label", "error", "heldout_error"}: the layer-local error of each candidate: relative squared error
    # of the consumers' outputs without bias, sum over consumers, on the choosing / held-out batches
    candidates: list[dict[str, Any]]
    chosen: str
    accepted: bool
    gain: float  # held-out relative gain of the best candidate over the state before (kept or not)
    # How the decision was taken: level (layer | block | model), the errors before and with the best
    # candidate on the choosing and the held-out batches, candidates tried downstream, cost, notes.
    decision: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.site + ("" if not self.layer else "[" + ",".join(map(str, self.layer)) + "]")

    @property
    def error_identity(self) -> float:
        return float(self.candidates[0]["error"])

    @property
    def error_chosen(self) -> float:
        e = next(c["error"] for c in self.candidates if c["label"] == self.chosen)
        return float("nan") if e is None else float(e)


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
    skipped: dict[str, str] = field(default_factory=dict)  # modules not quantized for their type: path -> type

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def n_accepted(self) -> int:
        """Sites (x layers) where a candidate was accepted (for smoothquant: every site, as applied)."""
        return sum(s.accepted for s in self.sites)

    @property
    def n_applied(self) -> int:
        """Sites (x layers) whose kept transform is not the identity (what was folded into the model)."""
        return sum(s.chosen != "identity" for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for s in d["sites"]:
            s["layer"] = list(s["layer"])
        d["summary"] = {"sites": self.n_sites, "accepted": self.n_accepted, "applied": self.n_applied}
        return d

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantReport:
        sites = [SiteReport(**{**s, "layer": tuple(s["layer"])}) for s in d.get("sites", [])]
        return cls(method=d["method"], format=d["format"], config=d.get("config", {}), sites=sites,
                   layers=d.get("layers", {}), permutations=d.get("permutations", {}),
                   gather_indices=d.get("gather_indices", {}), skipped=d.get("skipped", {}))

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
            f"Sites (x layers): {self.n_sites}; accepted: {self.n_accepted}; applied (not identity): "
            f"{self.n_applied}. Acceptance level: {self.config.get('accept')}.",
            "",
            "Errors are relative squared errors. Layer: the site's consumers' outputs (no bias), summed over",
            "consumers. Block / model: the enclosing block's outputs / the model output, every other layer",
            "quantized. 'before': the state before this decision; 'best': the best candidate on the choosing",
            "batches; gain: its relative held-out gain (kept only if > tau).",
            "",
            "| site | kind | consumers | level | best | choose before / best | held-out before / best | gain "
            "| chosen | accepted | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]

        def f(x):
            return "-" if x is None else f"{x:.4g}"

        for s in self.sites:
            d = s.decision
            lines.append(
                f"| {s.name} | {s.kind} | {', '.join(s.consumers)} | {d.get('level', '-')} | {d.get('best', '-')} | "
                f"{f(d.get('choose_before'))} / {f(d.get('choose_best'))} | {f(d.get('heldout_before'))} / "
                f"{f(d.get('heldout_best'))} | {100 * s.gain:.1f}% | {s.chosen} | {'yes' if s.accepted else 'no'} "
                f"| {d.get('note', '')} |"
            )
        if self.skipped:
            lines += ["", "Not quantized (module type): " + ", ".join(f"{p} ({t})" for p, t in self.skipped.items())]
        lines += ["", "Layer-local candidate errors on the choosing batches:", ""]
        for s in self.sites:
            cands = ", ".join(f"{c['label']}: {f(c['error'])}" for c in s.candidates)
            lines.append(f"- {s.name}: {cands}")
        return "\n".join(lines) + "\n"

    def save(self, stem: str) -> None:
        """Write `<stem>.json` and `<stem>.md`."""
        with open(stem + ".json", "w") as f:
            f.write(self.to_json())
        with open(stem + ".md", "w") as f:
            f.write(self.to_markdown())
