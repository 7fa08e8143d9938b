"""Neighbour contexts for composed guidance: whose perturbation effect stands in for a context's own.

Composed guidance (:mod:`lingshu.sampler`) adds a perturbation's effect to a context's control
distribution. By default the effect is the context-free pair ``log p(x | -, pert) - log p(x |
-, control)``; with ``neighbours = k`` it is the mean of ``log p(x | c, pert) - log p(x | c,
control)`` over the ``k`` contexts ``c`` seen in training with both the perturbation and the
control whose control expression profile (the model's, :func:`lingshu.sampler.expected_values`)
correlates best with the target context's. For a combination seen in training the context itself
is its own nearest neighbour. ``min_similarity = r`` leaves out the neighbours (other than the
nearest) whose correlation is below ``r``; the remaining ones then fill the ``k`` slots in turn,
nearest first, so with ``k = 3`` and two left the nearest counts twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["seen_contexts", "neighbour_pairs"]


def seen_contexts(frequencies: Sequence[Sequence[int]], ctx_cols: Sequence[int], pert_col: int) -> dict[int, set[tuple]]:
    """Perturbation id -> the context-id tuples seen with it in training.

    ``frequencies``: rows of condition ids (one per obs key) followed by a cell count, as
    stored in the checkpoint manifest.
    """
    seen: dict[int, set[tuple]] = {}
    for row in frequencies:
        if row[-1] > 0:
            seen.setdefault(int(row[pert_col]), set()).add(tuple(int(row[j]) for j in ctx_cols))
    return seen


def neighbour_pairs(cond: np.ndarray, *, ctx_cols: Sequence[int], pert_col: int, control_id: int,
                    frequencies: Sequence[Sequence[int]], profiles: Callable[[np.ndarray], np.ndarray], k: int,
                    fallback: tuple[np.ndarray, np.ndarray],
                    min_similarity: float | None = None) -> tuple[np.ndarray, ...]:
    """Condition ids of the ``k`` neighbour (perturbation, control) pairs of every row.

    Parameters
    ----------
    cond
        ``(N, K)`` target condition ids (extra columns such as library-size bins are carried over
        unchanged from ``fallback``).
    ctx_cols, pert_col, control_id
        Columns of the context keys and of the perturbation key, and the control's id.
    frequencies
        Training combinations with counts (:func:`seen_contexts`).
    profiles
        Maps ``(M, len(ctx_cols))`` context ids to ``(M, G)`` control expression profiles.
    k
        Neighbours per row. A row with fewer eligible contexts repeats them, nearest first.
    fallback
        The context-free pair ``(pert, control)``, kept for rows with no eligible context.
    min_similarity
        Leave out eligible contexts, other than the nearest, whose profile correlates with the
        target's below this (``None``: keep the ``k`` nearest whatever their similarity).

    Returns
    -------
    tuple of np.ndarray
        ``(pert_1, control_1, ..., pert_k, control_k)``, each ``(N, K)``.
    """
    ctx_cols = list(ctx_cols)
    seen = seen_contexts(frequencies, ctx_cols, pert_col)
    at_control = seen.get(control_id, set())
    targets = {tuple(int(v) for v in r) for r in cond[:, ctx_cols]}
    pool = sorted(at_control | targets)
    index = {c: i for i, c in enumerate(pool)}
    prof = np.asarray(profiles(np.array(pool, dtype=np.int64).reshape(len(pool), len(ctx_cols))), dtype=np.float64)
    prof = prof - prof.mean(1, keepdims=True)
    prof /= np.maximum(np.linalg.norm(prof, axis=1, keepdims=True), 1e-12)
    corr = prof @ prof.T  # Pearson correlation between the contexts' profiles
    out = [a.copy() for _ in range(k) for a in fallback]
    for key in {(tuple(int(v) for v in r[ctx_cols]), int(r[pert_col])) for r in cond}:
        target, pert = key
        eligible = sorted(seen.get(pert, set()) & at_control, key=lambda c: (-corr[index[target], index[c]], c))
        if not eligible:
            continue
        if min_similarity is not None:
            eligible = eligible[:1] + [c for c in eligible[1:] if corr[index[target], index[c]] >= min_similarity]
        rows = np.flatnonzero((cond[:, ctx_cols] == np.array(target)).all(1) & (cond[:, pert_col] == pert))
        for j in range(k):
            c = np.array(eligible[j % len(eligible)])
            out[2 * j][np.ix_(rows, ctx_cols)] = c
            out[2 * j + 1][np.ix_(rows, ctx_cols)] = c
            out[2 * j][rows, pert_col] = pert
            out[2 * j + 1][rows, pert_col] = control_id
    return tuple(out)
