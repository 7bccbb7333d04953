"""The similarity explorer and figures, headless: moving the slider changes the claimed layers,
the outlined cells and the text (STYLE.md 10)."""

from __future__ import annotations

import warnings

import matplotlib

matplotlib.use("Agg")

import pytest

from hpelib import bench, plots
from hpelib.similarity import claim_table, similarity_tables, threshold_sweep
from hpelib.widgets import similarity_explorer

warnings.filterwarnings("ignore", message=".*[Aa]dapter name.*")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tables():
    pm = bench.random_lora_model(bench.tiny_llama(seed=0), {
        "hpe": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        "ground": dict(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
    }, seed=2, b_scale=0.003, copy_base=False)
    return similarity_tables(pm)


def _outlined(fig) -> int:
    return sum(1 for ax in fig.axes for p in ax.patches if p.get_gid() == "claimed")


def test_heatmap_outlines_exactly_the_claims(tables):
    sim = tables[("base", "module")]
    for gap in (1e-5, 1e-4, 3e-4):
        fig = plots.plot_similarity_heatmap(sim, 1 - gap)
        n_claims = sum(len(c) for c in claim_table(sim, 1 - gap)["claimants"])
        assert _outlined(fig) == n_claims
    assert len(plots.plot_similarity_heatmap(sim).axes) == 3  # two panels and the colour bar
    assert _outlined(plots.plot_similarity_heatmap(sim)) == 0


def test_explorer_slider_changes_claims_outlines_and_text(tables):
    ex = similarity_explorer(tables, threshold=1 - 1e-6)
    assert ex.slider.min < -5 and ex.slider.max < 0  # log-spaced over 1 - threshold
    strict = (set(ex.claimed), ex.summary.value, ex.heatmap.value, ex.threshold_label.value)
    assert strict[0] and b"PNG" in bytes(strict[2])[:8]
    ex.slider.value = 10 ** (ex.slider.max - 0.05)  # a loose threshold: almost nothing claimed
    loose = (set(ex.claimed), ex.summary.value, ex.heatmap.value, ex.threshold_label.value)
    assert loose[0] < strict[0]
    assert loose[1] != strict[1] and bytes(loose[2]) != bytes(strict[2]) and loose[3] != strict[3]
    assert ex.claimed == {(r.layer, a) for r in claim_table(tables[("base", "module")], ex.threshold).itertuples()
                          for a in r.claimants}
    ex.granularity.value = "block"
    assert {unit for unit, _ in ex.claimed} <= {"layers.0", "layers.1"}
    ex.reference.value = "pairwise"
    assert "units claimed" in ex.summary.value


def test_explorer_accepts_a_lazy_callable(tables):
    calls = []

    def source(reference, granularity):
        calls.append((reference, granularity))
        return tables.get((reference, granularity))

    ex = similarity_explorer(source, threshold=0.9999)
    ex.granularity.value = "block"
    ex.granularity.value = "module"
    assert calls == [("base", "module"), ("base", "block")]  # each table asked for once


def test_threshold_sweep_figure(tables):
    sweep = threshold_sweep(tables[("base", "module")], [1 - 10.0 ** -k for k in range(2, 8)])
    fig = plots.plot_threshold_sweep(sweep)
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 3  # hpe, ground, (base)
    winners = plots.plot_winner_map(claim_table(tables[("base", "module")], 1 - 1e-6), ["hpe", "ground"])
    assert winners.axes
