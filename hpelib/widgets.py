"""Interactive views for the notebooks (`03_layer_similarity`): the similarity explorer.

Widgets hold no logic of their own: every number they show comes from `hpelib.similarity`
(`claim_table`, `claim_summary`) and every picture from `hpelib.plots`, so the explorer, the
static figures and the `wta_cosine` merge always agree on what a threshold claims.
"""

from __future__ import annotations

import io as _io
import math
from typing import Callable, Mapping

import ipywidgets as widgets
import pandas as pd

from hpelib import plots
from hpelib.similarity import (
    GRANULARITIES, REFERENCES, adapter_names, check_threshold, claim_summary, claim_table,
)


_MAX_GAP_EXP = -0.01  # 1 - threshold <= 10**-0.01 = 0.977: thresholds stay in (0, 1]


def _png(fig) -> bytes:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


class SimilarityExplorer(widgets.VBox):
    """Threshold explorer: a log-spaced slider on `1 - threshold`, reference and granularity
    dropdowns; shows the heatmap with the claimed cells outlined, the winner map, and per adapter
    the units won and the count and share of parameters it would contribute.

    Attributes for code (and tests): `slider` (`FloatLogSlider` over `1 - threshold`),
    `reference`, `granularity` (`Dropdown`s), `threshold` (float), `claims` (the current
    `claim_table`), `claimed` (set of `(unit, adapter)` claims), `summary` (`HTML`: the table),
    `heatmap`, `winner_map` (`Image` widgets, PNG).
    """

    def __init__(self, source: Mapping[tuple[str, str], pd.DataFrame] | Callable[[str, str], pd.DataFrame],
                 threshold: float = 0.9999):
        self._source = source
        self._cache: dict[tuple[str, str], pd.DataFrame] = {}
        if isinstance(source, Mapping):
            if not source:
                raise ValueError("no similarity tables given")
            keys = list(source)
            refs = [r for r in REFERENCES if any(k[0] == r for k in keys)]
            grans = [g for g in GRANULARITIES if any(k[1] == g for k in keys)]
            lo, hi = _gap_range(source.values())
        elif callable(source):
            refs, grans, (lo, hi) = list(REFERENCES), list(GRANULARITIES), (-10.0, _MAX_GAP_EXP)
        else:
            raise TypeError("source must be {(reference, granularity): table} or a callable (reference, granularity) -> table")
        gap = 1.0 - check_threshold(threshold)
        gap_exp = min(max(math.log10(gap) if gap > 0 else lo, lo), hi)
        self.reference = widgets.Dropdown(options=refs, value=refs[0], description="reference")
        self.granularity = widgets.Dropdown(options=grans, value=grans[0], description="granularity")
        self.slider = widgets.FloatLogSlider(value=10 ** gap_exp, base=10, min=lo, max=hi, step=0.05,
                                             description="1 − threshold", readout_format=".1e",
                                             continuous_update=False, style={"description_width": "initial"})
        self.threshold_label = widgets.HTML()
        self.heatmap = widgets.Image(format="png")
        self.winner_map = widgets.Image(format="png")
        self.summary = widgets.HTML()
        self.message = widgets.HTML()
        controls = widgets.HBox([self.reference, self.granularity])
        super().__init__([controls, widgets.HBox([self.slider, self.threshold_label]), self.message,
                          self.heatmap, widgets.HBox([self.winner_map, self.summary])])
        for w in (self.reference, self.granularity, self.slider):
            w.observe(self._on_change, names="value")
        self.claims: pd.DataFrame | None = None
        self.claimed: set[tuple[str, str]] = set()
        self.update()

    @property
    def threshold(self) -> float:
        return 1.0 - self.slider.value

    def table(self) -> pd.DataFrame | None:
        """The similarity table for the current reference and granularity (None if not available)."""
        key = (self.reference.value, self.granularity.value)
        if key not in self._cache:
            if isinstance(self._source, Mapping):
                self._cache[key] = self._source.get(key)
            else:
                self._cache[key] = self._source(*key)
        return self._cache[key]

    def _on_change(self, change) -> None:
        self.update()

    def update(self) -> None:
        """Recompute claims and redraw for the current controls."""
        t = self.threshold
        self.threshold_label.value = f"threshold = <b>{t:.10g}</b>"
        sim = self.table()
        if sim is None:
            self.message.value = (f"<i>no table for reference={self.reference.value!r}, "
                                  f"granularity={self.granularity.value!r}</i>")
            self.claims, self.claimed = None, set()
            self.summary.value, self.heatmap.value, self.winner_map.value = "", b"", b""
            return
        self.message.value = ""
        adapters = adapter_names(sim)
        self.claims = claim_table(sim, t)
        self.claimed = {(r.layer, a) for r in self.claims.itertuples() for a in r.claimants}
        summary = claim_summary(self.claims, adapters)
        summary["share"] = summary["share"].map(lambda s: f"{100 * s:.1f}%")
        self.summary.value = (f"<b>{int(self.claims['claimed'].sum())} of {len(self.claims)} units claimed</b>"
                              + summary.to_html(index=False))
        self.heatmap.value = _png(plots.plot_similarity_heatmap(sim, t))
        self.winner_map.value = _png(plots.plot_winner_map(self.claims, adapters))


def _gap_range(tables) -> tuple[float, float]:
    """Slider exponents `(lo, hi)` of `1 - threshold` covering the tables' `1 - cos` values."""
    values = pd.concat([t["one_minus_cos"] for t in tables if t is not None])
    positive = values[values > 0]
    if positive.empty:
        return -10.0, _MAX_GAP_EXP
    lo = math.floor(math.log10(positive.min())) - 1
    hi = min(_MAX_GAP_EXP, math.ceil(math.log10(positive.max())))
    return float(max(lo, -16)), float(hi if hi > lo else lo + 1)


def similarity_explorer(source, threshold: float = 0.9999) -> SimilarityExplorer:
    """The threshold explorer of `03_layer_similarity`.

    Args:
        source: `{(reference, granularity): layer_similarity table}` (e.g.
            `hpelib.similarity.similarity_tables(...)`), or a callable
            `(reference, granularity) -> table` called lazily (and cached) on first selection.
        threshold: initial threshold (the slider moves `1 - threshold` on a log scale).
    """
    return SimilarityExplorer(source, threshold)
