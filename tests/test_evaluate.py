"""Metric functions on hand-computed values (hpelib.evaluate)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from hpelib import evaluate as ev
from hpelib.backends.base import Sample

BOX = (0.1, 0.2, 0.5, 0.6)  # text [[100,200,500,600]]


def hpe(yaw, pitch, roll, box="[[100,200,500,600]]"):
    return f"{box} yaw:{yaw} pitch:{pitch} roll:{roll}"


def gt_frame(rows):
    return pd.DataFrame([dict(zip(("yaw", "pitch", "roll"), r), x0=BOX[0], y0=BOX[1], x1=BOX[2], y1=BOX[3])
                         for r in rows])


# --------------------------------------------------------------------------- pose_mae
def test_pose_mae_wraps_at_180():
    m = ev.pose_mae([[179.0, -179.0, 90.0]], [[-179.0, 179.0, -90.0]])
    assert m["mae_yaw"] == pytest.approx(2.0)  # not 358
    assert m["mae_pitch"] == pytest.approx(2.0)
    assert m["mae_roll"] == pytest.approx(180.0)
    assert m["mae_mean"] == pytest.approx((2 + 2 + 180) / 3)


def test_pose_mae_hand_computed_and_invalid_rows():
    pred = np.array([[10.0, 0.0, -5.0], [np.nan, np.nan, np.nan], [-20.0, 4.0, 1.0]])
    gt = np.array([[12.0, 3.0, -5.0], [0.0, 0.0, 0.0], [-10.0, 0.0, 0.0]])
    m = ev.pose_mae(pred, gt, penalty_deg=90.0)
    # valid rows: errors (2, 3, 0) and (10, 4, 1)
    assert m["mae_yaw"] == pytest.approx(6.0)
    assert m["mae_pitch"] == pytest.approx(3.5)
    assert m["mae_roll"] == pytest.approx(0.5)
    assert m["mae_mean"] == pytest.approx(10.0 / 3)
    assert (m["n"], m["n_valid"]) == (3, 2)
    # mae_all: the invalid row counts 90 per angle
    assert m["mae_all_yaw"] == pytest.approx((2 + 90 + 10) / 3)
    assert m["mae_all_pitch"] == pytest.approx((3 + 90 + 4) / 3)
    assert m["mae_all_roll"] == pytest.approx((0 + 90 + 1) / 3)
    assert m["mae_all"] == pytest.approx((102 + 97 + 91) / 9)


def test_pose_mae_accepts_dataframes_and_partial_nan_is_invalid():
    pred = pd.DataFrame({"yaw": [1.0, 5.0], "pitch": [0.0, np.nan], "roll": [0.0, 0.0]})
    gt = pd.DataFrame({"roll": [0.0, 0.0], "yaw": [0.0, 0.0], "pitch": [0.0, 0.0]})  # column order irrelevant
    m = ev.pose_mae(pred, gt)
    assert m["n_valid"] == 1 and m["mae_yaw"] == pytest.approx(1.0)


def test_pose_mae_no_valid_answer_is_nan_and_inputs_unchanged():
    pred = np.full((2, 3), np.nan)
    gt = np.zeros((2, 3))
    m = ev.pose_mae(pred, gt, penalty_deg=30.0)
    assert math.isnan(m["mae_mean"]) and m["mae_all"] == pytest.approx(30.0)
    assert np.isnan(pred).all() and (gt == 0).all()


def test_pose_mae_rejects_bad_shapes_and_nan_gt():
    with pytest.raises(ValueError, match="shape"):
        ev.pose_mae(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="gt"):
        ev.pose_mae(np.zeros((1, 3)), np.full((1, 3), np.nan))


def test_aflw_filter_drops_any_angle_beyond_99():
    gt = np.array([[99.0, 0, 0], [99.5, 0, 0], [0, -100.0, 0], [0, 0, 120.0], [-50.0, 30.0, 10.0]])
    assert ev.aflw_filter(gt).tolist() == [True, False, False, False, True]


# --------------------------------------------------------------------------- boxes
def test_box_iou_hand_computed_vectorised():
    a = np.array([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1], [np.nan, 0, 1, 1]], dtype=float)
    b = np.array([[1, 1, 3, 3], [0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 1, 1]], dtype=float)
    iou = ev.box_iou(a, b)
    assert_allclose(iou[:3], [1 / 7, 1.0, 0.0])
    assert np.isnan(iou[3])
    assert ev.box_iou([0, 0, 1, 1], [0, 0, 0.5, 1]) == pytest.approx(0.5)  # broadcasting, 1-D


def test_acc_at_counts_nan_as_miss():
    assert ev.acc_at([0.5, 0.49, np.nan, 0.9]) == pytest.approx(0.5)


# --------------------------------------------------------------------------- score_hpe
def test_score_hpe_hand_computed():
    gt = gt_frame([(10, 0, 0), (179, 0, 0), (0, 0, 0), (0, 0, 0)])
    answers = [
        hpe(12, -1, 1),  # errors 2, 1, 1; box exact
        hpe(-179, 0, 0, box="[[600,600,900,900]]"),  # wrap: 2, 0, 0; box misses (IoU 0)
        "[[100,200,500,600]]",  # a box answer to the head-pose prompt: blended
        "I cannot see a head",  # malformed
    ]
    # no filtering here (|angle| <= 180), so the wrap at +-180 is exercised
    table, m = ev.score_hpe(answers, gt, penalty_deg=90.0, max_abs_angle=180.0)
    assert len(table) == 4 and m["n"] == 4 and m["n_filtered"] == 0 and m["n_valid"] == 2
    assert m["mae_yaw"] == pytest.approx(2.0)
    assert m["mae_pitch"] == pytest.approx(0.5)
    assert m["mae_roll"] == pytest.approx(0.5)
    assert m["mae_mean"] == pytest.approx(1.0)
    assert m["valid_rate"] == pytest.approx(0.5)  # invalid answers stay in the denominator
    assert m["blended_rate"] == pytest.approx(0.25)
    assert m["malformed_rate"] == pytest.approx(0.25)
    # per angle: (2+2+90+90)/4, (1+0+90+90)/4, (1+0+90+90)/4
    assert m["mae_all"] == pytest.approx((184 + 181 + 181) / 12)
    assert m["box_acc50"] == pytest.approx(0.25)
    assert m["box_iou_median"] == pytest.approx(0.0)  # IoUs 1, 0, 0 (invalid), 0 (invalid)
    assert table["kind"].tolist() == ["hpe", "hpe", "blended", "malformed"]
    assert table["err_yaw"].iloc[1] == pytest.approx(2.0)
    assert np.isnan(table["pred_yaw"].iloc[2])  # a blended answer carries no pose into the metrics


def test_score_hpe_aflw_filter_drops_before_scoring():
    gt = gt_frame([(10, 0, 0), (120, 0, 0), (0, -100, 0), (0, 0, 99)])
    answers = [hpe(14, 0, 0), "garbage", hpe(0, 0, 0), hpe(0, 0, 97)]
    table, m = ev.score_hpe(answers, gt, penalty_deg=90.0)  # default max_abs_angle 99
    assert (m["n"], m["n_filtered"], m["n_valid"]) == (2, 2, 2)
    assert m["valid_rate"] == 1.0  # the dropped garbage answer is not scored
    assert m["mae_yaw"] == pytest.approx(2.0) and m["mae_roll"] == pytest.approx(1.0)
    assert table["gt_yaw"].tolist() == [10, 0]


def test_score_hpe_all_invalid():
    gt = gt_frame([(0, 0, 0), (10, 10, 10)])
    _, m = ev.score_hpe(["", "yaw:1 pitch:2 roll:3"], gt, penalty_deg=45.0)
    assert m["valid_rate"] == 0.0 and math.isnan(m["mae_mean"]) and m["mae_all"] == pytest.approx(45.0)
    assert m["box_acc50"] == 0.0


def test_score_hpe_length_mismatch():
    with pytest.raises(ValueError, match="answers"):
        ev.score_hpe(["x"], gt_frame([(0, 0, 0), (0, 0, 0)]))


# --------------------------------------------------------------------------- grounding and confusion
def test_score_grounding_per_target():
    gt = np.array([BOX, BOX, BOX, (0.0, 0.0, 0.2, 0.2)])
    answers = ["[[100,200,500,600]]", hpe(1, 2, 3), "[[100,200,300,600]]", "[[000,000,200,200]]"]
    table, m = ev.score_grounding(answers, gt, ["head", "head", "cube", "cube"])
    # IoUs: 1, invalid (a head-pose answer to a grounding prompt is blended), 0.5, 1
    assert m["acc50"] == pytest.approx(0.75)
    assert m["valid_rate"] == pytest.approx(0.75)
    assert m["blended_rate"] == pytest.approx(0.25)
    assert m["acc50:head"] == pytest.approx(0.5) and m["acc50:cube"] == pytest.approx(1.0)
    assert m["valid_rate:head"] == pytest.approx(0.5)
    assert table["iou"].iloc[2] == pytest.approx(0.5)


def test_answer_kind_confusion_counts_and_rates():
    prompts = ["hpe", "hpe", "hpe", "box:head", "box:object", "box:object"]
    answers = [hpe(1, 2, 3), "[[100,200,500,600]]", "garbage", hpe(1, 2, 3), "[[100,200,500,600]]",
               "[[100,200,500,600]] yaw:1"]
    counts = ev.answer_kind_confusion(prompts, answers)
    assert list(counts.columns) == ["hpe", "box", "blended", "malformed"]
    assert list(counts.index) == ["hpe", "box:head", "box:object"]
    assert counts.loc["hpe"].tolist() == [1, 0, 1, 1]
    assert counts.loc["box:head"].tolist() == [0, 0, 1, 0]
    assert counts.loc["box:object"].tolist() == [0, 1, 1, 0]
    rates = ev.answer_kind_confusion(prompts, answers, normalize=True)
    assert_allclose(rates.sum(axis=1), 1.0)
    assert rates.loc["hpe", "hpe"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- variants
class EchoBackend:
    """Answers every head-pose prompt with its true pose + 5 deg yaw, every grounding prompt with
    the true box; records the size and the tasks of every batch it was asked."""

    def __init__(self):
        self.batches = []
        self.tasks = []

    def generate(self, samples, max_new_tokens=48):
        from hpelib.prompts import format_box, format_hpe

        self.batches.append(len(samples))
        self.tasks.append([x.task for x in samples])
        out = []
        for s in samples:
            m = s.meta
            if s.task == "hpe":
                out.append(format_hpe(m["box"], m["yaw"] + 5, m["pitch"], m["roll"]))
            else:
                out.append(format_box(m["box"]))
        return out


def samples():
    img = np.zeros((8, 8, 3), np.uint8)
    return [
        Sample(img, "pose?", task="hpe", meta=dict(yaw=10.0, pitch=0.0, roll=0.0, box=BOX)),
        Sample(img, "pose?", task="hpe", meta=dict(yaw=-30.0, pitch=5.0, roll=2.0, box=BOX)),
        Sample(img, "pose?", task="hpe", meta=dict(yaw=150.0, pitch=0.0, roll=0.0, box=BOX)),  # filtered
        Sample(img, "where?", task="box", meta=dict(box=BOX, target="head", target_kind="head")),
        Sample(img, "where?", task="box", meta=dict(box=(0.0, 0.0, 0.3, 0.3), target="cube")),
    ]


def test_generate_answers_batches_by_task_and_answers_in_order():
    b = EchoBackend()
    s = samples()
    mixed = [s[0], s[3], s[1], s[4], s[2]]  # hpe, box, hpe, box, hpe
    answers = ev.generate_answers(b, mixed, batch_size=2, max_new_tokens=8, progress=False)
    assert b.batches == [2, 2, 1] and len(answers) == 5
    assert b.tasks == [["box", "box"], ["hpe", "hpe"], ["hpe"]]  # like answers generated together
    assert answers == EchoBackend().generate(mixed)  # each answer back at its sample's place


def test_evaluate_variant_flat_keys_and_table():
    b = EchoBackend()
    metrics, table = ev.evaluate_variant(b, {"synth-aflw": samples()}, "wta_cosine@0.9999", batch_size=4,
                                         progress=False)
    assert sum(b.batches) == 4  # the out-of-protocol sample is never generated for
    k = "wta_cosine@0.9999/synth-aflw/"
    assert metrics[k + "mae_yaw"] == pytest.approx(5.0)
    assert metrics[k + "mae_mean"] == pytest.approx(5.0 / 3)
    assert metrics[k + "valid_rate"] == 1.0 and metrics[k + "n_filtered"] == 1
    assert metrics[k + "grounding_acc50"] == 1.0 and metrics[k + "grounding_acc50:object"] == 1.0
    assert metrics[k + "grounding_acc50:head"] == 1.0
    assert set(table["prompt_type"]) == {"hpe", "box:head", "box:object"}
    assert (table["variant"] == "wta_cosine@0.9999").all()


def test_score_variant_is_pure_and_checks_names():
    s = samples()
    answers = {"d": [hpe(10, 0, 0), "", hpe(0, 0, 0), "[[100,200,500,600]]", "x"]}
    m1, _ = ev.score_variant("base", answers, {"d": s})
    m2, _ = ev.score_variant("base", answers, {"d": s})
    assert m1 == m2
    assert m1["base/d/valid_rate"] == pytest.approx(0.5) and m1["base/d/n_filtered"] == 1
    assert m1["base/d/grounding_acc50"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="variant"):
        ev.score_variant("a/b", answers, {"d": s})


# --------------------------------------------------------------------------- references and tables
def test_relative_change_and_published():
    assert ev.relative_change(3.97 * (1 - 0.315), 3.97) == pytest.approx(-0.315)
    assert ev.SIXDREPNET_PUBLISHED["aflw2000"]["mean"] == 3.97
    pub = ev.published_metrics(["biwi"])
    assert pub == {f"{ev.PUBLISHED_VARIANT}/biwi/mae_{a}": v
                   for a, v in {"yaw": 3.24, "pitch": 4.48, "roll": 2.68, "mean": 3.47}.items()}
    rel = ev.relative_changes({"wta_cosine@0.9999/aflw2000/mae_mean": 2.0, "base/synth-aflw/mae_mean": 9.0})
    assert rel == {f"wta_cosine@0.9999/aflw2000/mae_mean_vs_{ev.PUBLISHED_VARIANT}": pytest.approx(2.0 / 3.97 - 1)}
    with pytest.raises(ValueError):
        ev.relative_change(1.0, 0.0)


def test_relative_changes_against_a_run_baseline():
    m = {"cnn6d/d/mae_mean": 10.0, "wta_cosine@0.9999/d/mae_mean": 8.0, "base/d/mae_mean": 20.0}
    rel = ev.relative_changes(m, reference="cnn6d")
    assert rel == {"wta_cosine@0.9999/d/mae_mean_vs_cnn6d": pytest.approx(-0.2),
                   "base/d/mae_mean_vs_cnn6d": pytest.approx(1.0)}


def test_results_table_parses_flat_keys_and_orders_variants():
    metrics = {
        "wta_cosine@0.99999/synth-aflw/mae_mean": 3.0,
        "wta_cosine@0.999/synth-aflw/mae_mean": 1.0,
        "wta_cosine@0.9999/synth-aflw/mae_mean": 2.0,
        "base/synth-aflw/mae_mean": 30.0,
        "base/synth-aflw/valid_rate": 0.1,
        "lora_hpe/synth-biwi/mae_mean": 7.0,
        "train/loss": 0.5,  # other stages' keys are ignored
        "lora_hpe/synth-biwi/grounding_acc50": 0.9,  # not a chosen column
    }
    t = ev.results_table(metrics, ["mae_mean", "valid_rate"])
    assert list(t.index) == ["base", "lora_hpe", "wta_cosine@0.999", "wta_cosine@0.9999", "wta_cosine@0.99999"]
    assert list(t.columns) == [("synth-aflw", "mae_mean"), ("synth-aflw", "valid_rate"),
                               ("synth-biwi", "mae_mean"), ("synth-biwi", "valid_rate")]
    assert t.loc["wta_cosine@0.9999", ("synth-aflw", "mae_mean")] == 2.0
    assert t.loc["base", ("synth-aflw", "valid_rate")] == 0.1
    assert np.isnan(t.loc["base", ("synth-biwi", "mae_mean")])
    curve = ev.metric_curve(metrics, "wta_cosine", "synth-aflw", "mae_mean")
    assert curve.index.tolist() == [0.999, 0.9999, 0.99999] and curve.tolist() == [1.0, 2.0, 3.0]


def test_save_and_load_table_round_trip(tmp_path):
    m, table = ev.score_variant("base", {"d": [hpe(10, 0, 0), "", hpe(0, 0, 0), "[[100,200,500,600]]", "x"]},
                                {"d": samples()})
    path = ev.save_table(table, tmp_path / "eval" / "base.csv")
    back = ev.load_table(path)
    assert back["answer"].tolist() == table["answer"].tolist()
    assert_allclose(back["err_yaw"].to_numpy(), table["err_yaw"].to_numpy())


def test_run_variants_lists_base_adapters_and_only_the_latest_merges(tmp_path):
    from hpelib.evaluate import run_variants

    (tmp_path / "adapters" / "hpe").mkdir(parents=True)
    (tmp_path / "adapters" / "hpe" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapters" / "unfinished").mkdir()  # no adapter_config.json: not a variant
    for name in ("wta_cosine@0.9999", "task_arithmetic@0.5", "ties@0.2"):
        (tmp_path / "merges" / name).mkdir(parents=True)
        (tmp_path / "merges" / name / "merge_manifest.json").write_text("{}")
    # the latest 04_merge built two of the three; the third is left from an earlier setting
    (tmp_path / "merges" / "merge_summary.csv").write_text("name\ntask_arithmetic@0.5\nwta_cosine@0.9999\n")
    table = run_variants(tmp_path)
    assert table["variant"].tolist() == ["base", "lora:hpe", "task_arithmetic@0.5", "wta_cosine@0.9999"]
    assert table.set_index("variant").loc["lora:hpe", "kind"] == "lora"


def test_reference_metrics_compare_every_variant_with_the_converged_cnn():
    metrics = {"base/synth-aflw/mae_mean": 20.0, "cnn6d@budget/synth-aflw/mae_mean": 10.0,
               "cnn6d@converged/synth-aflw/mae_mean": 8.0, "lora:hpe/synth-aflw/mae_mean": 6.0}
    datasets = {"test": {"synth-aflw": None}}
    out = ev.reference_metrics(metrics, datasets)
    assert out["base/synth-aflw/vs_cnn6d"] == pytest.approx((20 - 8) / 8)
    assert out["lora:hpe/synth-aflw/vs_cnn6d"] == pytest.approx((6 - 8) / 8)
    assert out["cnn6d@budget/synth-aflw/vs_cnn6d"] == pytest.approx(0.25)
    assert "cnn6d@converged/synth-aflw/vs_cnn6d" not in out
    assert out["base/synth-aflw/mae_mean_vs_cnn6d@budget"] == pytest.approx(1.0)  # both comparisons kept
    assert not any(k.startswith("6drepnet") for k in out)  # published numbers only for real test sets
    # only the budget CNN trained: it is the reference
    only_budget = {k: v for k, v in metrics.items() if not k.startswith("cnn6d@converged")}
    out = ev.reference_metrics(only_budget, datasets)
    assert out["base/synth-aflw/vs_cnn6d"] == pytest.approx(1.0)
    assert "cnn6d@budget/synth-aflw/vs_cnn6d" not in out
