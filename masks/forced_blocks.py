"""Forced blocks of NSA's selected branch (eqs. 11–12 as pinned): the n_init first selection
blocks and the n_local blocks ending at the query's own block, which top-n always keeps among
the candidates (j·l' ≤ t). For l' = 2, n_init = 1, n_local = 2, the query at t = 7 (block 3):

    block    0   1   2   3
    t=7      F   .   F   F      (F: forced; the rest of n go by score)
"""

from __future__ import annotations


def is_forced(j, cur, n_init: int, n_local: int):
    """Whether selection block j is forced for a query in block cur (given j ≤ cur): one of the
    n_init first blocks or of the n_local blocks ending at cur. The one statement of the rule."""
    return (j < n_init) | (j > cur - n_local)
