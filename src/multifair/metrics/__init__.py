"""Fairness metrics (AUC, group AUC, ES-AUC, ES-ACC, DPD, DEOdds, between-group disparity,
per-group selection rate / TPR / FPR), vectorised bootstrap CIs, the metrics summary and its
table. Definitions and edge-case policies: `multifair.metrics.fairness` and docs/metrics.md."""

from multifair.metrics.bootstrap import (
    bootstrap_indices,
    bootstrap_metrics,
    percentile_interval,
    resample_counts,
    weighted_auc,
)
from multifair.metrics.fairness import (
    SINGLE_CLASS_POLICIES,
    UNKNOWN,
    UNKNOWN_POLICIES,
    GroupTable,
    MultiClassTable,
    accuracy,
    between_group_disparity,
    demographic_parity_difference,
    disaggregate,
    disaggregate_multiclass,
    equalized_odds_difference,
    es_acc,
    es_auc,
    false_positive_rate_by_group,
    group_auc,
    roc_auc,
    selection_rate_by_group,
    true_positive_rate_by_group,
)
from multifair.metrics.groups import encode_groups, group_name, intersect
from multifair.metrics.missing import format_missingness, summarize_missingness
from multifair.metrics.summary import summarize
from multifair.metrics.table import format_table

__all__ = [
    "SINGLE_CLASS_POLICIES",
    "UNKNOWN",
    "UNKNOWN_POLICIES",
    "GroupTable",
    "MultiClassTable",
    "accuracy",
    "between_group_disparity",
    "bootstrap_indices",
    "bootstrap_metrics",
    "demographic_parity_difference",
    "disaggregate",
    "disaggregate_multiclass",
    "encode_groups",
    "equalized_odds_difference",
    "es_acc",
    "es_auc",
    "false_positive_rate_by_group",
    "format_missingness",
    "format_table",
    "group_auc",
    "group_name",
    "intersect",
    "percentile_interval",
    "resample_counts",
    "roc_auc",
    "selection_rate_by_group",
    "summarize",
    "summarize_missingness",
    "true_positive_rate_by_group",
    "weighted_auc",
]
