"""Plotly figures of the dashboard: pure functions from tally.dashboard.data values to figures.

Kept apart from the Streamlit views so figures can be built and checked in tests without a server.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from tally.dashboard.data import Grid
from tally.dashboard.search_data import Dimension

_CELL = 54  # pixels per grid row: room for two lines of cell text


def _grid_layout(fig: go.Figure, title: str, rows: list[str], cols: list[str]) -> go.Figure:
    fig.update_layout(title=title, height=140 + _CELL * len(rows),
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    # every tick shown (plotly would thin out category labels) and the first domain on top
    fig.update_xaxes(type="category", tickmode="array", tickvals=cols, ticktext=cols, side="bottom")
    fig.update_yaxes(type="category", tickmode="array", tickvals=rows, ticktext=rows, autorange="reversed")
    return fig


def accuracy_heatmap(grid: Grid, title: str | None = None) -> go.Figure:
    """Pair accuracy heat map; each cell shows its accuracy and training count, empty pairs blank."""
    rows, cols = [str(d) for d in grid.acc.index], [str(c) for c in grid.acc.columns]
    z = grid.acc.to_numpy(dtype=float)
    custom = np.dstack([grid.n.to_numpy(), grid.n_train.to_numpy()])
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isnan(z), None, z).tolist(), x=cols, y=rows, zmin=0.0, zmax=1.0, colorscale="Viridis",
        text=grid.labels(), texttemplate="%{text}", textfont={"size": 11}, customdata=custom,
        hoverongaps=False, xgap=1, ygap=1,
        colorbar={"title": "acc"},
        hovertemplate="domain %{y}<br>class %{x}<br>accuracy %{z:.3f}<br>n test %{customdata[0]}"
                      "<br>n train %{customdata[1]}<extra></extra>"))
    return _grid_layout(fig, title or grid.split, rows, cols)


def difference_heatmap(diff: pd.DataFrame, title: str) -> go.Figure:
    """Accuracy difference (a - b) per pair on a diverging scale centred at 0; blank where undefined."""
    rows, cols = [str(d) for d in diff.index], [str(c) for c in diff.columns]
    z = diff.to_numpy(dtype=float)
    text = [["" if np.isnan(v) else f"{v:+.2f}" for v in row] for row in z]
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isnan(z), None, z).tolist(), x=cols, y=rows, zmid=0.0, zmin=-bound, zmax=bound,
        colorscale="RdBu", text=text, texttemplate="%{text}", hoverongaps=False, xgap=1, ygap=1,
        colorbar={"title": "Δ acc"},
        hovertemplate="domain %{y}<br>class %{x}<br>Δ %{z:+.3f}<extra></extra>"))
    return _grid_layout(fig, title, rows, cols)


def shot_bars(frame: pd.DataFrame, title: str) -> go.Figure:
    """Mean pair accuracy per shot bucket (many/medium/few/zero), one bar group per trial."""
    fig = px.bar(frame, x="bucket", y="accuracy", color="trial", barmode="group", title=title,
                 category_orders={"bucket": ["many", "medium", "few", "zero"]}, range_y=[0, 1])
    return fig.update_layout(margin={"t": 50})


def curves_figure(frame: pd.DataFrame, y: str, warmup_end: float | None = None) -> go.Figure:
    """One metric per epoch, a line per trial; a dotted line where warm-up (ERM) ends."""
    fig = px.line(frame.dropna(subset=[y]), x="epoch", y=y, color="trial", markers=True, title=y)
    if warmup_end is not None:
        fig.add_vline(x=warmup_end + 0.5, line_dash="dot", annotation_text="end of warm-up")
    return fig.update_layout(margin={"t": 50}, height=340)


def progress_figure(frame: pd.DataFrame, metric: str) -> go.Figure:
    """Selection metric by trial order, coloured by status, with the best-so-far staircase."""
    fig = px.scatter(frame, x="order", y="value", color="status", hover_data=["trial_id"],
                     labels={"order": "trial (start order)", "value": metric}, title=f"{metric} by trial")
    fig.add_trace(go.Scatter(x=frame["order"], y=frame["best_so_far"], mode="lines", name="best so far",
                             line={"shape": "hv", "color": "black"}))
    return fig.update_layout(margin={"t": 50}, height=360)


def importance_bars(values: pd.Series, title: str) -> go.Figure:
    fig = px.bar(x=values.to_numpy(), y=[str(i) for i in values.index], orientation="h", title=title,
                 labels={"x": "importance", "y": "parameter"})
    return fig.update_layout(yaxis={"autorange": "reversed"}, margin={"t": 50}, height=120 + 30 * len(values))


def parallel_figure(dims: list[Dimension], color: list[float], metric: str) -> go.Figure:
    """Parallel coordinates of the sampled configs, coloured by the selection metric."""
    dimensions = []
    for d in dims:
        spec = {"label": d.label, "values": d.values}
        if d.tickvals is not None:
            spec.update(tickvals=d.tickvals, ticktext=d.ticktext)
        dimensions.append(spec)
    fig = go.Figure(go.Parcoords(dimensions=dimensions,
                                 line={"color": color, "colorscale": "Viridis", "showscale": True,
                                       "colorbar": {"title": metric}}))
    return fig.update_layout(margin={"l": 60, "r": 60, "t": 60, "b": 30}, height=420)
