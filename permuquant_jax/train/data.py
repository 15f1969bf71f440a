"""Procedurally generated scenes with captions: coloured shapes on a light background, made from a seed.

Every scene is drawn from ``numpy.random.default_rng([seed, index])``, so scene ``index`` of a seed is
the same picture and caption on every machine, whatever else was drawn before. Three kinds of scene:

- one shape: ``"a red circle"``, ``"a small blue square"``, ``"a big green triangle"``;
- a count: ``"two yellow circles"``, ``"three red triangles"`` (the same shape and colour, apart);
- a relation: ``"a red circle above a blue square"`` (``above``, ``below``, ``to the left of``,
  ``to the right of``; the first-named shape is the one the relation is about).

Shapes are rendered with 4x4 supersampling (smooth edges) and never overlap. Images are RGB, square,
``size`` pixels a side (a multiple of 16, as FLUX's 8x autoencoder with 2x2 packed latents needs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

IMAGE_SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (235, 235, 235)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
}
SHAPES = ("circle", "square", "triangle")
COUNTS = {2: "two", 3: "three"}
RELATIONS = ("above", "below", "to the left of", "to the right of")
SIZES = {"small": 0.7, "big": 1.35}
KIND_WEIGHTS = {"one": 0.3, "count": 0.2, "relation": 0.5}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, centre (x right, y down, in pixels) and radius in pixels."""

    kind: str
    colour: str
    x: float
    y: float
    r: float


@dataclasses.dataclass(frozen=True)
class Scene:
    """A caption and the shapes it describes (in the caption's order), for a ``size`` x ``size`` picture."""

    caption: str
    shapes: tuple[Shape, ...]
    size: int


def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 16 or size % 16:
        raise ValueError(f"scene size must be a positive multiple of 16 pixels, got {size!r}")


def _plural(shape: str) -> str:
    return shape + "s"


def _apart(shapes: Sequence[Shape], x: float, y: float, r: float, margin: float) -> bool:
    return all(math.hypot(s.x - x, s.y - y) >= s.r + r + margin for s in shapes)


def _place(rng: np.random.Generator, size: int, r: float, others: Sequence[Shape], margin: float,
           box: tuple[float, float, float, float] | None = None) -> tuple[float, float] | None:
    """A centre for a shape of radius ``r`` inside the picture (and ``box`` = x0, y0, x1, y1 if given),
    clear of ``others``; None if 100 draws found none."""
    lo, hi = r + 1.0, size - r - 1.0
    x0, y0, x1, y1 = box if box is not None else (lo, lo, hi, hi)
    x0, y0, x1, y1 = max(x0, lo), max(y0, lo), min(x1, hi), min(y1, hi)
    if x0 > x1 or y0 > y1:
        return None
    for _ in range(100):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if _apart(others, x, y, r, margin):
            return float(x), float(y)
    return None


def _one(rng: np.random.Generator, size: int) -> Scene:
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    adjective = rng.choice(["", "", "small", "big"])
    r = size * 0.16 * (SIZES[adjective] if adjective else 1.0) * rng.uniform(0.9, 1.1)
    x, y = _place(rng, size, r, [], 0.0)
    words = ["a", adjective, colour, kind] if adjective else ["a", colour, kind]
    return Scene(" ".join(words), (Shape(str(kind), str(colour), x, y, r),), size)


def _count(rng: np.random.Generator, size: int) -> Scene | None:
    n = int(rng.choice(list(COUNTS)))
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    r = size * (0.13 if n == 2 else 0.11) * rng.uniform(0.9, 1.1)
    shapes: list[Shape] = []
    for _ in range(n):
        at = _place(rng, size, r, shapes, 0.08 * size)
        if at is None:
            return None
        shapes.append(Shape(str(kind), str(colour), *at, r))
    return Scene(f"{COUNTS[n]} {colour} {_plural(str(kind))}", tuple(shapes), size)


def _relation(rng: np.random.Generator, size: int) -> Scene | None:
    (c1, c2), (s1, s2) = rng.choice(list(COLOURS), 2), rng.choice(SHAPES, 2)
    if c1 == c2 and s1 == s2:
        return None
    rel = rng.choice(RELATIONS)
    r1, r2 = (size * 0.14 * rng.uniform(0.9, 1.1) for _ in range(2))
    half, gap = size / 2.0, 0.06 * size
    # The first shape goes in its half of the picture and the second in the other half, roughly in line.
    if rel in ("above", "below"):
        top, bottom = (0.0, half - gap / 2), (half + gap / 2, float(size))
        b1, b2 = (top, bottom) if rel == "above" else (bottom, top)
        cx = rng.uniform(0.3 * size, 0.7 * size)
        box1 = (cx - 0.15 * size, b1[0] + r1, cx + 0.15 * size, b1[1] - r1)
        box2 = (cx - 0.15 * size, b2[0] + r2, cx + 0.15 * size, b2[1] - r2)
    else:
        left, right = (0.0, half - gap / 2), (half + gap / 2, float(size))
        b1, b2 = (left, right) if rel == "to the left of" else (right, left)
        cy = rng.uniform(0.3 * size, 0.7 * size)
        box1 = (b1[0] + r1, cy - 0.15 * size, b1[1] - r1, cy + 0.15 * size)
        box2 = (b2[0] + r2, cy - 0.15 * size, b2[1] - r2, cy + 0.15 * size)
    p1 = _place(rng, size, r1, [], 0.0, box1)
    if p1 is None:
        return None
    first = Shape(str(s1), str(c1), *p1, r1)
    p2 = _place(rng, size, r2, [first], gap, box2)
    if p2 is None:
        return None
    return Scene(f"a {c1} {s1} {rel} a {c2} {s2}", (first, Shape(str(s2), str(c2), *p2, r2)), size)


def make_scene(seed: int, index: int, size: int = IMAGE_SIZE) -> Scene:
    """Scene ``index`` of ``seed`` (shapes + caption), the same on every run."""
    _check_size(size)
    rng = np.random.default_rng([int(seed), int(index)])
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    while True:
        kind = rng.choice(kinds, p=weights / weights.sum())
        scene = {"one": _one, "count": _count, "relation": _relation}[str(kind)](rng, size)
        if scene is not None:
            return scene


def shape_mask(shape: Shape, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of the points (``xs``, ``ys`` in pixels) inside ``shape``."""
    dx, dy = xs - shape.x, ys - shape.y
    if shape.kind == "circle":
        return dx * dx + dy * dy <= shape.r * shape.r
    if shape.kind == "square":
        h = shape.r * 0.85  # about the circle's area
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape.kind == "triangle":
        # Upward, apex at (0, -r), base at y = +0.75 r from -r to +r (centroid near the centre).
        apex, base = -shape.r, 0.75 * shape.r
        inside_y = (dy >= apex) & (dy <= base)
        half_width = shape.r * (dy - apex) / (base - apex)
        return inside_y & (np.abs(dx) <= half_width)
    raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {list(SHAPES)}")


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 RGB ``[size, size, 3]`` (4x4 supersampled, box-filtered).

    Only the pixels of each shape's bounding box are supersampled (the rest is background); in a box
    every shape is tested, later shapes drawn over earlier ones, so overlapping boxes agree."""
    n, s = scene.size, SUPERSAMPLE
    out = np.empty((n, n, 3), np.uint8)
    out[:] = np.asarray(BACKGROUND, np.uint8)
    bg = np.asarray(BACKGROUND, np.float32)
    for shape in scene.shapes:
        (y0, x0), (y1, x1) = ([max(0, int(math.floor(c - shape.r - 1))) for c in (shape.y, shape.x)],
                              [min(n, int(math.ceil(c + shape.r + 1))) for c in (shape.y, shape.x)])
        sub_y = y0 + (np.arange((y1 - y0) * s, dtype=np.float32) + 0.5) / s
        sub_x = x0 + (np.arange((x1 - x0) * s, dtype=np.float32) + 0.5) / s
        xs, ys = np.meshgrid(sub_x, sub_y)
        box = np.empty(xs.shape + (3,), np.float32)
        box[:] = bg
        for other in scene.shapes:
            box[shape_mask(other, xs, ys)] = np.asarray(COLOURS[other.colour], np.float32)
        box = box.reshape(y1 - y0, s, x1 - x0, s, 3).mean(axis=(1, 3))
        out[y0:y1, x0:x1] = np.round(box).astype(np.uint8)
    return out


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1] (the autoencoder's input range)."""
    return (np.asarray(images, np.float32) / 127.5 - 1.0).astype(np.float32)


def make_dataset(num: int, seed: int = 0, size: int = IMAGE_SIZE, start: int = 0) -> tuple[np.ndarray, list[str],
                                                                                              list[Scene]]:
    """Scenes ``start .. start + num - 1`` of ``seed``: (uint8 images ``[num, size, size, 3]``, captions, scenes)."""
    if num < 1:
        raise ValueError(f"make_dataset: num must be >= 1, got {num}")
    scenes = [make_scene(seed, start + i, size) for i in range(num)]
    return np.stack([render(sc) for sc in scenes]), [sc.caption for sc in scenes], scenes


def all_captions() -> list[str]:
    """Every caption the generator can write, sorted (for encoding them once)."""
    out = set()
    for c in COLOURS:
        for s in SHAPES:
            out.add(f"a {c} {s}")
            out.update(f"a {a} {c} {s}" for a in SIZES)
            out.update(f"{w} {c} {_plural(s)}" for w in COUNTS.values())
            for c2 in COLOURS:
                for s2 in SHAPES:
                    if (c, s) != (c2, s2):
                        out.update(f"a {c} {s} {rel} a {c2} {s2}" for rel in RELATIONS)
    return sorted(out)


# The quality table's evaluation prompts (``benchmarks/quality_tiny.py``): every plain single-shape caption
# and eight relations / counts / sizes. Calibration never uses them.
EVAL_SINGLE = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
EVAL_OTHER = ["a red circle above a blue square", "a green triangle to the left of a yellow circle",
              "a blue square below a red triangle", "a yellow square to the right of a green circle",
              "two red circles", "three blue triangles", "a big green square", "a small yellow triangle"]
CALIBRATION_SEED = 20261201  # a seed the training data (seed 0 and its derivatives) does not use


def calibration_captions(num: int = 64, seed: int = CALIBRATION_SEED) -> list[str]:
    """``num`` distinct training-grammar captions for calibrating a DiT trained on these scenes, in the
    training distribution's proportions (the scenes ``0, 1, ...`` of ``seed``, first occurrences kept), none
    of them an evaluation prompt (``EVAL_SINGLE``, ``EVAL_OTHER``)."""
    if num < 1 or num > len(all_captions()) - len(EVAL_SINGLE) - len(EVAL_OTHER):
        raise ValueError(f"calibration_captions: num must be in 1..{len(all_captions()) - 20}, got {num}")
    banned, out, index = set(EVAL_SINGLE) | set(EVAL_OTHER), [], 0
    while len(out) < num:
        caption = make_scene(seed, index, 64).caption
        if caption not in banned and caption not in out:
            out.append(caption)
        index += 1
    return out


def calibration_prompts_text(num: int = 64, seed: int = CALIBRATION_SEED) -> str:
    """The text of the calibration prompts file (``assets.make_tiny_pipeline.CALIBRATION_FILE``): a ``#``
    header, then :func:`calibration_captions`, one per line."""
    return (f"# {num} training-grammar captions (permuquant_jax.train.data.calibration_captions({num}, seed={seed})) "
            "for calibrating a DiT trained by permuquant_jax.train.tiny; none is a prompt of "
            "benchmarks/quality_tiny.py\n" + "\n".join(calibration_captions(num, seed)) + "\n")
