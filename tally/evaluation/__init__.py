"""Scoring: the per-(domain, class) table and every metric from it, their intervals, the reports.

The front door re-exports the table and metrics (metrics.py); intervals.py (bootstrap intervals,
paired comparisons, seed summaries) and report.py (`tally report` / `tally compare` text) are
imported as submodules: `from tally.evaluation import intervals`.
"""

from tally.evaluation.metrics import (  # noqa: F401
    COUNT_COLUMNS,
    DATASET_SHOT_THRESHOLDS,
    DEFAULT_SHOT_THRESHOLDS,
    GRID_VALUES,
    HIGHER_IS_BETTER,
    METRIC_LABELS,
    METRIC_NAMES,
    TABLE_COLUMNS,
    ShotThresholds,
    accuracy_grid,
    all_metrics,
    count_arrays,
    difference_grid,
    domain_accuracies,
    metric_arrays,
    metric_label,
    metrics_from_counts,
    pair_accuracy,
    pair_counts,
    pair_table,
    shot_thresholds,
    shot_thresholds_of,
    split_metrics,
    worst_pairs,
)
