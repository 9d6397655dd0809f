"""Plotly figures of the dashboard: pure functions from the data layer's values to figures.

Kept apart from the Streamlit views so figures can be built and checked in tests without a server.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tally.dashboard.grids import Grid
from tally.dashboard.search_data import Dimension

_CELL = 34  # pixels per grid row when cells carry text
_ROW = 22  # pixels per grid row of a large grid (no text)
STATUS_COLORS = {"done": "#2a9d8f", "running": "#457b9d", "stopped": "#e9c46a", "failed": "#e63946",
                 "pending": "#adb5bd"}


def _grid_layout(fig: go.Figure, title: str, rows: list[str], cols: list[str], all_ticks: bool = True,
                 row_px: int = _CELL, extra: int = 0, **where) -> go.Figure:
    """Title, height and category axes of a grid; ``where`` (row=, col=) picks the grid's subplot."""
    fig.update_layout(title=title, height=140 + extra + row_px * len(rows),
                      margin={"l": 10, "r": 10, "t": 50, "b": 10})
    if all_ticks:  # every tick shown (plotly would thin out category labels)
        fig.update_xaxes(type="category", tickmode="array", tickvals=cols, ticktext=cols, side="bottom", **where)
    else:  # hundreds of classes: plotly thins the labels; zoom in to read them, hover for any cell
        fig.update_xaxes(type="category", side="bottom", **where)
    fig.update_yaxes(type="category", tickmode="array", tickvals=rows, ticktext=rows, autorange="reversed",
                     **where)
    return fig


def accuracy_heatmap(grid: Grid, title: str | None = None, profile: pd.Series | None = None,
                     profile_label: str = "training count") -> go.Figure:
    """Pair accuracy heat map in the grid's class order; empty pairs blank.

    Each cell shows its accuracy (2 decimals; nothing else, so it always fits the cell) and, on hover,
    its training count and test n. Above the cells, sharing their x axis (zoom and pan move both), the
    training-count profile of the classes: the long tail the grid is read against. Above
    LARGE_GRID_CLASSES classes the cells carry no text and the grid is a zoomable overview.
    """
    rows, cols = [str(d) for d in grid.acc.index], [str(c) for c in grid.acc.columns]
    z = grid.acc.to_numpy(dtype=float)
    custom = np.dstack([grid.n.to_numpy(), grid.n_train.to_numpy()])
    heat = go.Heatmap(
        z=np.where(np.isnan(z), None, z).tolist(), x=cols, y=rows, zmin=0.0, zmax=1.0, colorscale="Viridis",
        customdata=custom, hoverongaps=False, xgap=0 if grid.large else 1, ygap=1,
        colorbar={"title": "acc", "len": 0.7, "y": 0.35 if profile is not None else 0.5},
        hovertemplate="domain %{y}<br>class %{x}<br>accuracy %{z:.3f}<br>n test %{customdata[0]}"
                      "<br>n train %{customdata[1]}<extra></extra>")
    if not grid.large:
        heat.update(text=grid.labels(), texttemplate="%{text}", textfont={"size": 11})
    row_px = _ROW if grid.large else _CELL
    if profile is None:
        fig = go.Figure(heat)
        return _grid_layout(fig, title or grid.split, rows, cols, not grid.large, row_px)
    profile_px = 110
    grid_px = row_px * len(rows) + 40
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.03,
                        row_heights=[profile_px / (profile_px + grid_px), grid_px / (profile_px + grid_px)])
    fig.add_trace(heat, row=2, col=1)
    fig.add_trace(go.Bar(x=cols, y=profile.reindex(cols).to_numpy(), marker={"color": "#888"},
                         name=profile_label, showlegend=False,
                         hovertemplate="class %{x}<br>" + profile_label + " %{y}<extra></extra>"), row=1, col=1)
    log = bool((profile > 0).any())  # long tails span decades; zero-shot classes get no bar
    fig.update_yaxes(title_text="train n", type="log" if log else "linear", dtick=1 if log else None, row=1, col=1)
    fig.update_xaxes(type="category", showticklabels=False, row=1, col=1)
    return _grid_layout(fig, title or grid.split, rows, cols, not grid.large, row_px, extra=profile_px,
                        row=2, col=1)


def shot_heatmap(shots: pd.DataFrame, title: str) -> go.Figure:
    """Mean pair accuracy per domain (rows) and shot bucket (columns); pair counts on hover."""
    buckets = [b for b in ("many", "medium", "few", "zero") if b in shots.columns]
    z = shots[buckets].to_numpy(dtype=float)
    pairs = shots[[f"{b} pairs" for b in buckets]].to_numpy()
    text = [["" if np.isnan(v) else f"{v:.2f}" for v in row] for row in z]
    rows = [str(i) for i in shots.index]
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isnan(z), None, z).tolist(), x=buckets, y=rows, zmin=0.0, zmax=1.0,
        colorscale="Viridis", text=text, texttemplate="%{text}", customdata=pairs, hoverongaps=False,
        xgap=1, ygap=1, colorbar={"title": "acc"},
        hovertemplate="domain %{y}<br>%{x}-shot pairs: %{customdata}<br>mean accuracy %{z:.3f}<extra></extra>"))
    return _grid_layout(fig, title, rows, buckets)


def difference_heatmap(diff: pd.DataFrame, title: str, scale: str = "Δ acc") -> go.Figure:
    """Accuracy difference (a - b) per pair on a diverging scale centred at 0; blank where undefined."""
    rows, cols = [str(d) for d in diff.index], [str(c) for c in diff.columns]
    z = diff.to_numpy(dtype=float)
    text = [["" if np.isnan(v) else f"{v:+.2f}" for v in row] for row in z]
    bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(
        z=np.where(np.isnan(z), None, z).tolist(), x=cols, y=rows, zmid=0.0, zmin=-bound, zmax=bound,
        colorscale="RdBu", text=text, texttemplate="%{text}", hoverongaps=False, xgap=1, ygap=1,
        colorbar={"title": scale},
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


def tuning_curves_figure(curves: pd.DataFrame, title: str) -> go.Figure:
    """Best validation value found against the number of trials, a line per method, with the 95%
    interval over trial orders as error bars (tally.search.tuning.tuning_curves)."""
    frame = curves.assign(up=curves["high"] - curves["best"], down=curves["best"] - curves["low"])
    fig = px.line(frame, x="trials", y="best", color="method", markers=True, error_y="up", error_y_minus="down",
                  title=title, labels={"best": "best validation value so far", "trials": "trials"})
    return fig.update_layout(margin={"t": 50}, height=360).update_xaxes(dtick=1)


def progress_figure(frame: pd.DataFrame, metric: str) -> go.Figure:
    """Selection metric by trial order, coloured by status, with the best-so-far staircase."""
    fig = px.scatter(frame, x="order", y="value", color="status", hover_data=["trial_id"],
                     labels={"order": "trial (start order)", "value": metric}, title=f"{metric} by trial")
    fig.add_trace(go.Scatter(x=frame["order"], y=frame["best_so_far"], mode="lines", name="best so far",
                             line={"shape": "hv", "color": "black"}))
    return fig.update_layout(margin={"t": 50}, height=360)


def pareto_figure(points: pd.DataFrame, x: str, y: str, tolerance: float,
                  modes: tuple[str, str] = ("max", "max")) -> go.Figure:
    """The two objectives of every finished trial: the Pareto front joined by a line, the picked trial
    starred, and the band of trials within ``tolerance`` of the best ``x`` (where the pick is made).
    ``modes``: each objective's direction (results.Selection.modes); 'min' for an ECE, Brier, NLL, AURC."""
    fig = go.Figure()
    rest, front = points[~points["front"]], points[points["front"]].sort_values(x)
    x_band = _tolerance_band(points[x], tolerance, modes[0])
    picked = points[points["picked"]]
    fig.add_trace(go.Scatter(x=rest[x], y=rest[y], mode="markers", name="dominated", text=rest["trial_id"],
                             marker={"color": "#adb5bd", "size": 8}))
    fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="markers+lines", name="Pareto front",
                             # the staircase's corners join the better x and the better y of neighbours
                             text=front["trial_id"], line={"shape": "hv" if modes[0] == "max" else "vh",
                                                           "color": "#2a9d8f"},
                             marker={"color": "#2a9d8f", "size": 10}))
    fig.add_trace(go.Scatter(x=picked[x], y=picked[y], mode="markers", name="picked", text=picked["trial_id"],
                             marker={"symbol": "star", "color": "#e63946", "size": 18}))
    if x_band is not None:
        fig.add_vrect(x0=x_band[0], x1=x_band[1], fillcolor="#e9c46a", opacity=0.2, line_width=0)
    fig.update_traces(hovertemplate="%{text}<br>" + x + ": %{x:.4f}<br>" + y + ": %{y:.4f}<extra></extra>")
    return fig.update_layout(title=f"Pareto front: {y} against {x}", xaxis_title=x, yaxis_title=y,
                             margin={"t": 50}, height=420)


def _tolerance_band(values: pd.Series, tolerance: float, mode: str) -> tuple[float, float] | None:
    """Where the Pareto pick is made on the first objective: within ``tolerance`` of its best value (the
    highest, or for a lower-is-better metric the lowest); None without values."""
    if values.empty:
        return None
    if mode == "max":
        return float(values.max()) - tolerance, float(values.max())
    return float(values.min()), float(values.min()) + tolerance


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


def timeline_figure(frame: pd.DataFrame, lane: str = "trial_id") -> go.Figure:
    """Gantt chart of trials (start to end, coloured by status); one lane per trial or per node."""
    fig = px.timeline(frame, x_start="start", x_end="end", y=lane, color="status",
                      color_discrete_map=STATUS_COLORS, hover_data=["trial_id", "node", "duration_s"],
                      title="Trials over time")
    lanes = frame[lane].nunique()
    fig.update_yaxes(autorange="reversed", type="category")
    return fig.update_layout(margin={"t": 50}, height=min(900, 160 + (14 if lane == "trial_id" else 40) * lanes))


def intermediate_figure(frame: pd.DataFrame, metric: str) -> go.Figure:
    """Every trial's per-epoch ``metric``, one WebGL trace per status (lines split by gaps), so thousands
    of trials draw fast; trials stopped early end where the scheduler stopped them."""
    fig = go.Figure()
    for status, group in frame.groupby("status", sort=True):
        xs, ys, ids = [], [], []
        for trial_id, t in group.groupby("trial_id", sort=False):
            t = t.sort_values("epoch")
            xs += [*t["epoch"].tolist(), None]
            ys += [*t["value"].tolist(), None]
            ids += [trial_id] * len(t) + [None]
        fig.add_trace(go.Scattergl(x=xs, y=ys, mode="lines+markers", name=f"{status} ({group['trial_id'].nunique()})",
                                   line={"color": STATUS_COLORS.get(status), "width": 1}, marker={"size": 3},
                                   customdata=ids, connectgaps=False,
                                   hovertemplate="%{customdata}<br>epoch %{x}<br>%{y:.4f}<extra></extra>"))
    return fig.update_layout(title=f"{metric} per epoch, every trial", xaxis_title="epoch", yaxis_title=metric,
                             margin={"t": 50}, height=380)


def slice_figure(study, params: list[str], metric: str) -> go.Figure:
    """Optuna's slice plot: the metric against each parameter, one panel per parameter."""
    import optuna  # only when the Search view draws it

    fig = optuna.visualization.plot_slice(study, params=params, target_name=metric)
    return fig.update_layout(height=380, margin={"t": 50})


def contour_figure(study, x: str, y: str, metric: str) -> go.Figure:
    """Optuna's contour plot of the metric over two parameters (interpolated; trials as dots)."""
    import optuna

    fig = optuna.visualization.plot_contour(study, params=[x, y], target_name=metric)
    return fig.update_layout(height=480, margin={"t": 50})


def reliability_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    """Reliability diagram: accuracy against mean confidence per equal-mass bin, one line per group
    (dashed after temperature scaling), beside the diagonal of perfect calibration."""
    fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="calibrated",
                               line={"color": "grey", "dash": "dot"}, hoverinfo="skip"))
    for (group, when), rows in frame.groupby(["group", "when"], sort=False):
        fig.add_trace(go.Scatter(
            x=rows["confidence"].tolist(), y=rows["accuracy"].tolist(), mode="lines+markers", name=f"{group} ({when})",
            line={"dash": "solid" if when == "before" else "dash"}, customdata=rows["n"].tolist(),
            hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>n %{customdata}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="confidence (mean of the bin)", yaxis_title="accuracy",
                      xaxis_range=[0, 1], yaxis_range=[0, 1.02], height=420, legend={"font": {"size": 10}})
    return fig


def risk_coverage_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    """Risk (error rate of the kept examples) against coverage, most confident kept first."""
    fig = go.Figure()
    for when, rows in frame.groupby("when", sort=False):
        fig.add_trace(go.Scatter(x=rows["coverage"].tolist(), y=rows["risk"].tolist(), mode="lines", name=when,
                                 line={"dash": "solid" if when == "before" else "dash"}))
    fig.update_layout(title=title, xaxis_title="coverage", yaxis_title="risk (error rate)", xaxis_range=[0, 1],
                      height=420)
    return fig
