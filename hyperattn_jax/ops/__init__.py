"""Pure-jnp building blocks of HyperAttention in the grouped layout (q `[B, K, G, T, H]`, k, v `[B, K, S, H]`), in
pipeline order: hash (`hyperattn_jax.lsh`) -> plan (`make_plan`: sort order, global keys, samples; random keys from
`plan_keys`) -> tiles (`hyper_attention_tiles`) -> estimate (`tiled_attention`) -> merge (`merge_partials`) -> causal
recursion (`grouped_causal_attention`). `grouped_attention` picks exact, estimate or recursion on a backend's parts.
`group_queries` and friends convert from `[B, T, N, H]`.
"""

from hyperattn_jax._layout import group_queries, heads_major, ungroup_lse, ungroup_output
from hyperattn_jax.ops.causal import AttentionParts, grouped_attention, grouped_causal_attention, quarter_is_exact
from hyperattn_jax.ops.estimate import (
    attend_tiles,
    block_diagonal_attention,
    grouped_hyper_attention,
    grouped_hyper_attention_merged,
    sampled_residual_attention,
    tiled_attention,
    tiled_attention_backward,
)
from hyperattn_jax.ops.keys import PlanKeys, level_keys, plan_keys, split_level
from hyperattn_jax.ops.merge import merge_partials
from hyperattn_jax.ops.plan import (
    SortLSHPlan,
    exact_plan,
    make_plan,
    plan_projections,
    probe_column_mass,
    probe_index,
    top_k_index,
)
from hyperattn_jax.ops.sorting import SortOrder, gather_rows, sort_order, sort_orders, sort_rows, unsort_rows
from hyperattn_jax.ops.tiles import (
    KeyTile,
    TileRows,
    block_diagonal_tile,
    block_query_layout,
    global_key_tile,
    hyper_attention_tiles,
    plan_rows,
    sample_value_mix,
    sampled_residual_tile,
    shrink_sample_values,
    unblock_query_layout,
)

__all__ = [
    "AttentionParts",
    "KeyTile",
    "PlanKeys",
    "SortLSHPlan",
    "SortOrder",
    "TileRows",
    "attend_tiles",
    "block_diagonal_attention",
    "block_diagonal_tile",
    "block_query_layout",
    "exact_plan",
    "gather_rows",
    "global_key_tile",
    "group_queries",
    "grouped_attention",
    "grouped_causal_attention",
    "grouped_hyper_attention",
    "grouped_hyper_attention_merged",
    "heads_major",
    "hyper_attention_tiles",
    "level_keys",
    "make_plan",
    "merge_partials",
    "plan_keys",
    "plan_projections",
    "probe_column_mass",
    "plan_rows",
    "probe_index",
    "quarter_is_exact",
    "sampled_residual_attention",
    "sample_value_mix",
    "sampled_residual_tile",
    "shrink_sample_values",
    "sort_order",
    "sort_orders",
    "sort_rows",
    "split_level",
    "tiled_attention",
    "tiled_attention_backward",
    "top_k_index",
    "unblock_query_layout",
    "ungroup_lse",
    "ungroup_output",
    "unsort_rows",
]
