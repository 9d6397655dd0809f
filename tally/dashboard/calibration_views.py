"""The calibration section of the accuracy-grid tab: does the model know when it is wrong?

For one split of one trial: a reliability diagram per domain and for the tail pairs together (before
and after temperature scaling), the risk-coverage curve, and a calibration grid (each pair's mean
confidence minus its accuracy) beside the accuracy grids. Numbers from evaluation/calibration.py; a run
without logits.npz (trained before it was kept) says so once.
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from tally.evaluation import calibration


@st.cache_data(max_entries=16, show_spinner=False)
def _views(run_dir: str, split: str, stamp: float) -> dict | None:
    return calibration.split_views(run_dir, split)


def calibration_section(run_dir: Path, trial_id: str, split: str) -> None:
    from tally.dashboard import charts  # plotly: imported when a chart is drawn

    path = Path(run_dir) / calibration.LOGITS_FILE
    st.subheader("Calibration")
    if not path.is_file():
        st.caption("No calibration: this trial kept no logits (logits.npz; runs trained before it was kept).")
        return
    views = _views(str(run_dir), split, path.stat().st_mtime)
    if views is None:
        st.caption(f"No calibration on {split}: its logits were not kept.")
        return
    t = views["temperature"]
    st.caption(f"{split}, equal-mass bins of confidence (the top softmax probability); "
               + (f"dashed: after temperature scaling (T = {t:.2f}, fitted on validation)." if t
                  else "no temperature (none fitted, or this is the validation split it would be fitted on)."))
    left, right = st.columns(2)
    left.plotly_chart(charts.reliability_figure(views["reliability"], f"{split}: reliability diagram ({trial_id})"),
                      key=f"reliability:{split}")
    right.plotly_chart(charts.risk_coverage_figure(views["risk"], f"{split}: risk-coverage ({trial_id})"),
                       key=f"risk_coverage:{split}")
    st.plotly_chart(charts.difference_heatmap(views["gap"], f"{split}: calibration gap per pair, confidence "
                                              f"minus accuracy ({trial_id})", scale="conf - acc"),
                    key=f"calibration_grid:{split}", config={"scrollZoom": True, "displaylogo": False})
    st.caption("Calibration grid: > 0 (red) the model is overconfident on the pair, < 0 underconfident.")
