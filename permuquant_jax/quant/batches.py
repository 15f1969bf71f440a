"""Calibration batches: accept a list, an iterable factory or a generator; split them by sample group
(trajectory / prompt) into a part that chooses and a part that accepts."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from typing import Any

Batches = Sequence[Any] | Callable[[], Iterable[Any]] | Iterator[Any]


def materialize(batches: Batches, notes: list[str] | None = None) -> list[Any]:
    """The batches as a list: a sequence as is, a callable called once, an iterator (generator) read
    once (noted in `notes`: the method reads the batches several times, so it keeps them)."""
    if callable(batches) and not isinstance(batches, Sequence):
        out = list(batches())
    elif isinstance(batches, Iterator):
        out = list(batches)
        if notes is not None:
            out_n = len(out)
            notes.append(f"calibration batches came from a generator/iterator: read once and kept ({out_n} batches)")
    else:
        out = list(batches)
    if not out:
        raise ValueError("no calibration batches were given (an empty list, or an iterable that yielded nothing); "
                         "pass at least one batch")
    return out


def split_batches(
    batches: Sequence[Any], groups: Sequence[Hashable] | Callable[[Any], Hashable] | None = None
) -> tuple[list[int], list[int]]:
    """Indices of the choosing and the accepting batches, split by group, never inside a group.

    groups: a label per batch, or a function batch -> label (e.g. the prompt or trajectory id); None:
    every batch is its own group (splitting inside batches along the sample axis: `split_samples`).
    Groups in order of first appearance alternate: even -> choosing, odd
    -> accepting (deterministic). With a single group both parts are all batches (nothing is held out).
    """
    n = len(batches)
    if groups is None:
        labels: list[Hashable] = list(range(n))
    elif callable(groups):
        labels = [groups(b) for b in batches]
    else:
        labels = list(groups)
        if len(labels) != n:
            raise ValueError(f"split groups: {len(labels)} labels for {n} batches; give one label per batch")
    order: dict[Hashable, int] = {}
    for lb in labels:
        order.setdefault(lb, len(order))
    if len(order) < 2:
        return list(range(n)), list(range(n))
    choose = [i for i, lb in enumerate(labels) if order[lb] % 2 == 0]
    held = [i for i, lb in enumerate(labels) if order[lb] % 2 == 1]
    return choose, held


def _leading(batch: Any) -> set[int]:
    import jax

    return {int(a.shape[0]) if getattr(a, "ndim", 0) else -1 for a in jax.tree.leaves(batch)}


def can_split_samples(batches: Sequence[Any]) -> bool:
    """Whether every array of every batch has the same leading (sample) axis of at least 2 entries."""
    return all(len(s := _leading(b)) == 1 and min(s) >= 2 for b in batches)


def split_samples(batches: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Each batch cut along its leading sample axis: even samples choose, odd samples accept (so every
    trajectory / prompt is on one side only when a batch holds one sample of each)."""
    import jax

    choose = [jax.tree.map(lambda a: a[0::2], b) for b in batches]
    held = [jax.tree.map(lambda a: a[1::2], b) for b in batches]
    return choose, held
