"""Per-step reduction of element-wise LCA into every grouping's groups (DESIGN §6–7).

For each tensor the numba kernel makes one fused pass (LCA = Δ·ḡ, per-row sums, count of
LCA < 0, per-element cumulative); the row sums are then added into the groups of each grouping,
whole tensors by one ordered sum, bucketed rows by segment ids. All sums are float64 and run in
a fixed order, so results do not depend on threads or workers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from replay.groups import Grouping
from replay.kernel import reduce_rows

BLOCK = 1 << 16  # elements per "row" for tensors no grouping splits by rows


class GroupReducer:
    """Maps tensors of the flat vector to the cube's group axis (all groupings concatenated)."""

    def __init__(self, groupings: Sequence[Grouping], names: Sequence[str],
                 shapes: dict, offsets: np.ndarray):
        self.groupings = list(groupings)
        base = np.cumsum([0] + [len(g.labels) for g in self.groupings])
        self.n_groups = int(base[-1])
        self.first = slice(int(base[0]), int(base[1]))  # the grouping the residual uses
        self.plan = []
        for i, name in enumerate(names):
            a, b = int(offsets[i]), int(offsets[i + 1])
            shape = tuple(shapes[name])
            whole, rows = [], []
            for k, g in enumerate(self.groupings):
                if name in g.row_groups:
                    rows.append(np.asarray(g.row_groups[name], dtype=np.int64) + base[k])
                else:
                    whole.append(int(base[k]) + int(g.tensor_group[name]))
            row_len = (b - a) // shape[0] if rows and shape and shape[0] else BLOCK
            self.plan.append((a, b, max(row_len, 1), np.array(whole, dtype=np.int64), rows))

    def reduce(self, gbar: np.ndarray, delta: np.ndarray, cum: np.ndarray):
        """(D,) ḡ and Δ (same dtype), (D,) float64 ``cum`` updated in place.

        Returns (lca (n_groups,) float64, helped (n_groups,) int64).
        """
        lca = np.zeros(self.n_groups, dtype=np.float64)
        helped = np.zeros(self.n_groups, dtype=np.int64)
        for a, b, row_len, whole, rows in self.plan:
            row_sum, row_neg = reduce_rows(gbar[a:b], delta[a:b], cum[a:b], row_len)
            if len(whole):
                lca[whole] += _ordered_sum(row_sum)
                helped[whole] += int(row_neg.sum())
            for seg in rows:
                np.add.at(lca, seg, row_sum)
                np.add.at(helped, seg, row_neg)
        return lca, helped


def _ordered_sum(x: np.ndarray) -> float:
    # np.sum uses pairwise summation whose blocking is fixed for a given length: deterministic.
    return float(np.sum(x))
