"""The figures of the benchmark scripts: every matplotlib call of the suite lives here.

A script's ``plots(result, out_dir)`` picks the data out of its result and calls
:func:`bars` or :func:`lines`; each writes one PNG into ``out_dir`` and returns its
file name in a list (empty when matplotlib is missing), so the lists add up to the
``plots`` entry of the result file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DPI = 110
TARGET_LINE = {"color": "red", "linestyle": "--", "linewidth": 1}
"""Style of a horizontal target line (pass ``label=...`` with it)."""
SLANTED = {"rotation": 30, "ha": "right", "fontsize": 8}
"""Tick labels that are too long to stand upright side by side."""


def plt_or_none():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


@dataclass
class Series:
    """One set of bars, one value per tick (``yerr``: the (below, above) error lengths)."""

    values: Sequence[float]
    label: str | None = None
    yerr: tuple[Sequence[float], Sequence[float]] | None = None
    color: str | Sequence[str] | None = None


@dataclass
class Line:
    """One plotted line of a :class:`Panel` (``style``: extra ``ax.plot`` keywords)."""

    values: Sequence[float]
    label: str
    style: dict = field(default_factory=lambda: {"marker": "o"})


@dataclass
class Panel:
    """One axes of line plots over the same ``xs`` (also the x ticks).

    ``log``: log y axis; ``log_x``: log x axis (the ticks keep the values of ``xs`` as labels);
    ``hlines``: ``ax.axhline`` keywords (``y``, style and ``label``).
    """

    xs: Sequence[float]
    lines: list[Line]
    xlabel: str
    ylabel: str
    title: str
    log: bool = False
    log_x: bool = False
    hlines: Sequence[dict] = ()


def _save(plt, fig, out_dir: Path, name: str) -> list[str]:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=DPI)
    plt.close(fig)
    return [name]


def _label(ax, ylabel: str, title: str, log: bool, legend: dict | None, xlabel: str | None = None) -> None:
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if legend is not None:
        ax.legend(**legend)
    ax.set_title(title)


def bars(out_dir: Path, name: str, ticks: Sequence[str], series: list[Series], *, ylabel: str, title: str,
         figsize: tuple[float, float], tick_style: dict | None = None, hlines: Sequence[dict] = (),
         log: bool = False, legend: dict | None = None) -> list[str]:
    """A bar chart: the series side by side at each tick (0.8 wide together), written as ``name``.

    ``hlines`` are ``ax.axhline`` keywords (``y`` and style); ``legend`` the ``ax.legend``
    keywords, or None for no legend.
    """
    plt = plt_or_none()
    if plt is None or not ticks or not series:
        return []
    fig, ax = plt.subplots(figsize=figsize)
    width = 0.8 / len(series)
    for i, s in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        style: dict = {} if s.label is None else {"label": s.label}
        if s.color is not None:
            style["color"] = s.color
        if s.yerr is not None:
            style.update(yerr=[list(s.yerr[0]), list(s.yerr[1])], capsize=3)
        ax.bar([j + offset for j in range(len(ticks))], s.values, width, **style)
    for line in hlines:
        ax.axhline(**line)
    ax.set_xticks(range(len(ticks)), ticks, **(tick_style or {}))
    _label(ax, ylabel, title, log, legend)
    return _save(plt, fig, out_dir, name)


def lines(out_dir: Path, name: str, panels: list[Panel], *, figsize: tuple[float, float],
          legend: dict | None = None) -> list[str]:
    """Line plots, one panel beside the other, written as ``name``."""
    plt = plt_or_none()
    if plt is None or not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel.lines:
            ax.plot(panel.xs, line.values, label=line.label, **line.style)
        for hline in panel.hlines:
            ax.axhline(**hline)
        if panel.log_x:
            ax.set_xscale("log")
            ax.minorticks_off()  # the labelled ticks are the xs; unlabelled minor ticks only add noise
            ax.set_xticks(panel.xs, [f"{x:g}" for x in panel.xs])
        else:
            ax.set_xticks(panel.xs)
        _label(ax, panel.ylabel, panel.title, panel.log, legend, xlabel=panel.xlabel)
    return _save(plt, fig, out_dir, name)
