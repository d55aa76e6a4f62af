"""Pure-jnp building blocks of HyperAttention, in the grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`).

Compose them to build variants: `make_plan` draws the hash order and samples; `block_diagonal_tile` and
`sampled_residual_tile` give the key tiles; `tiled_attention` attends a blocked query layout over any list of tiles;
`merge_partials` combines partial attentions by lse. `group_queries` and friends convert from `[B, T, N, H]`.
"""

from hyperattn_jax._layout import group_queries, heads_major, ungroup_lse, ungroup_output
from hyperattn_jax.ops.causal import grouped_causal_attention
from hyperattn_jax.ops.sorting import SortOrder, gather_rows, sort_order, sort_orders, sort_rows, unsort_rows
from hyperattn_jax.ops.sortlsh import (
    SortLSHPlan,
    block_diagonal_attention,
    block_diagonal_tile,
    block_query_layout,
    grouped_hyper_attention,
    grouped_hyper_attention_merged,
    hyper_attention_tiles,
    make_plan,
    probe_column_mass,
    probe_index,
    sampled_residual_attention,
    sampled_residual_tile,
    unblock_query_layout,
)
from hyperattn_jax.ops.tiles import KeyTile, merge_partials, tiled_attention

__all__ = [
    "KeyTile",
    "SortLSHPlan",
    "SortOrder",
    "block_diagonal_attention",
    "block_diagonal_tile",
    "block_query_layout",
    "gather_rows",
    "group_queries",
    "grouped_causal_attention",
    "grouped_hyper_attention",
    "grouped_hyper_attention_merged",
    "heads_major",
    "hyper_attention_tiles",
    "make_plan",
    "merge_partials",
    "probe_column_mass",
    "probe_index",
    "sampled_residual_attention",
    "sampled_residual_tile",
    "sort_order",
    "sort_orders",
    "sort_rows",
    "tiled_attention",
    "unblock_query_layout",
    "ungroup_lse",
    "ungroup_output",
    "unsort_rows",
]
