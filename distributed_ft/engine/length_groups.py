"""Length-grouped sub-batches: a micro-batch of rows of different lengths, run as a few forward/backward
passes over rows of similar length, each padded only to its own longest row.

The examples, their order in the global batch and the loss normalisation do not change (the loss is a sum
of per-example terms over a global count), so the step computes the padded step's gradient up to float
rounding while spending almost nothing on padding. A pass is never larger than the padded micro-batch
would have been, so peak memory does not grow. The split is the cheapest under a simple cost model: the
padded tokens of each pass plus a fixed cost per pass (`pass_cost` tokens: the per-call work of the
model's layers and the optimizer-free backward bookkeeping), solved exactly over the rows sorted by length.
"""
from __future__ import annotations

# A forward + backward pass costs this many tokens of work beside its padded tokens: measured on the
# benchmark's 4.2M Llama on CPU (a pass of 1 row x 16 tokens took as long as about 60 tokens of a large
# pass); a larger model only makes the fixed part relatively smaller.
PASS_COST_TOKENS = 64


def length_groups(lengths: list[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Positions 0..n-1 of a micro-batch split into groups of similar length, longest first, minimising
    sum(rows x longest row) + pass_cost x groups. Groups are runs of the rows sorted by length."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(order)
    # best[j]: the cost of the first j sorted rows; a group order[i:j] costs (j - i) x lengths[order[i]]
    best = [0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + (j - i) * lengths[order[i]] + pass_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def split_to(groups: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """`groups` split further until there are `count` of them (ranks of a sharded step must run the same
    number of passes): the group with the most padded tokens is halved each time."""
    groups = [list(g) for g in groups]
    if count > sum(len(g) for g in groups):
        raise ValueError(f"cannot split {sum(len(g) for g in groups)} rows into {count} passes")
    while len(groups) < count:
        splittable = [g for g in groups if len(g) > 1]
        largest = max(splittable, key=lambda g: len(g) * max(lengths[i] for i in g))
        at = groups.index(largest)
        half = len(largest) // 2
        groups[at:at + 1] = [largest[:half], largest[half:]]
    return groups
