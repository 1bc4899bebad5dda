"""How the δ corrections follow mlx-lm's tensor-parallel projections (`model.shard(group)`).

After `shard`, q_proj / k_proj / v_proj are all-to-sharded (rank i computes the i-th slice of
the output features, i.e. its share of the heads) and o_proj is sharded-to-all (partial
products, then an `all_sum`). The δ weights stay full-size on every rank, as in the adapter file:
- Δq / Δk / Δv: each rank adds the columns of its own slice, the same split as the projection;
- Δo: added by `DeltaMemAttention` to the attention's output, i.e. after o_proj's all_sum,
  once, the same full Δo on every rank;
- the memory projections read the full hidden state h, replicated on every rank, so every rank
  computes the same δ state bit for bit (DESIGN §1 runs unchanged; §12).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear

ALL_TO_SHARDED = (AllToShardedLinear, QuantizedAllToShardedLinear)


def full_out_dim(projection: nn.Module) -> int:
    """Output features of a (possibly all-to-sharded) linear layer before sharding."""
    rows = projection.weight.shape[0]
    if isinstance(projection, ALL_TO_SHARDED):
        rows *= projection.group.size()
    return rows


def rank_slice(projection: nn.Module, delta: Any) -> Any:
    """This rank's share of a correction to `projection`'s output.

    delta: Δ [..., out] or (reads [..., R], weight [..., R, out]) (the scaled δ weight);
    returned unchanged when `projection` is not all-to-sharded.
    """
    if not isinstance(projection, ALL_TO_SHARDED):
        return delta
    n, i = projection.group.size(), projection.group.rank()
    if isinstance(delta, mx.array):
        width = delta.shape[-1] // n
        return delta[..., i * width:(i + 1) * width]
    reads, weight = delta
    width = weight.shape[-1] // n
    return reads, weight[..., i * width:(i + 1) * width]
