"""Soft number targets (`hpelib.soft_targets`) on the tiny backend's real tokenizer and model."""

from __future__ import annotations

import math

import pytest
import torch

from hpelib import prompts
from hpelib.config import TrainConfig
from hpelib.soft_targets import NumberTargets
from test_tiny_backend import MICRO, random_samples


@pytest.fixture(scope="module")
def backend():
    from hpelib.backends.tiny import TinyBackend
    from hpelib.config import make_config

    return TinyBackend.build(make_config("smoke"), spec=MICRO, seed=0)


def answer_labels(tokenizer, answer: str) -> torch.Tensor:
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return torch.tensor([[-100] + ids])


def test_without_sigmas_the_loss_is_the_models_own(backend):
    batch = backend.collate([backend.encode(s) for s in random_samples(4)])
    own = backend.model(**batch).loss
    labels = batch.pop("labels")
    ours = NumberTargets.from_tokenizer(backend.tokenizer, 0, 0).loss(backend.model(**batch).logits, labels)
    assert torch.allclose(own, ours, atol=1e-5)


def test_a_near_angle_costs_less_than_a_far_one_only_with_an_angle_sigma(backend):
    tok = backend.tokenizer
    labels = answer_labels(tok, "yaw:40 pitch:5 roll:0")
    position = tok("yaw:40", add_special_tokens=False)["input_ids"].__len__()  # logits row predicting "40"

    def loss_when_predicting(value: str, targets: NumberTargets) -> float:
        logits = torch.zeros(1, labels.shape[1], len(tok.get_vocab()))
        logits[0, :, :] = -20.0
        for t in range(labels.shape[1] - 1):
            logits[0, t, labels[0, t + 1]] = 20.0  # every other token right
        logits[0, position - 1, labels[0, position]] = -20.0
        logits[0, position - 1, tok.convert_tokens_to_ids(value)] = 20.0
        return float(targets.loss(logits, labels))

    hard = NumberTargets.from_tokenizer(tok, 0, 0)
    soft = NumberTargets.from_tokenizer(tok, 5.0, 0)
    assert loss_when_predicting("41", hard) == pytest.approx(loss_when_predicting("-90", hard), rel=1e-4)
    assert loss_when_predicting("41", soft) < loss_when_predicting("-90", soft) - 0.2  # 40 x w(41) / 7 tokens


def test_the_target_of_an_angle_is_a_gaussian_over_the_signed_angle_tokens(backend):
    tok = backend.tokenizer
    t = NumberTargets.from_tokenizer(tok, 3.0, 10.0)
    assert len(t.angle_ids) == 361 and len(t.box_ids) == 1000
    row = t.angle_kernel[t.angle_index[tok.convert_tokens_to_ids("-12")]]
    values = [int(tok.convert_ids_to_tokens(int(i))) for i in t.angle_ids]
    assert values[int(row.argmax())] == -12
    assert float(row.sum()) == pytest.approx(1.0)
    ratio = float(row[values.index(-9)] / row[values.index(-12)])
    assert ratio == pytest.approx(math.exp(-9 / (2 * 9.0)), rel=1e-4)  # 3 degrees away, sigma 3
    box_row = t.box_kernel[t.box_index[tok.convert_tokens_to_ids("086")]]
    box_values = [int(tok.convert_ids_to_tokens(int(i))) for i in t.box_ids]
    assert box_values[int(box_row.argmax())] == 86
    assert t.angle_index[tok.convert_tokens_to_ids("-0")] == -1  # "-0" only appears in decimals


def test_numbers_outside_a_box_or_an_angle_field_keep_one_hot_targets(backend):
    """A count answer ("3") and a box value are not angles; the count is not a box value."""
    tok = backend.tokenizer
    hard = NumberTargets.from_tokenizer(tok, 0, 0)
    soft = NumberTargets.from_tokenizer(tok, 5.0, 0)
    for answer in ("3", prompts.format_box((0.1, 0.2, 0.5, 0.6))):
        labels = answer_labels(tok, answer)
        logits = torch.randn(1, labels.shape[1], len(tok.get_vocab()), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(hard.loss(logits, labels), soft.loss(logits, labels)), answer


def test_a_digit_tokenizer_is_refused_by_name():
    class Digits:
        def get_vocab(self):
            return {str(i): i for i in range(10)} | {"-": 10, " yaw:": 11}

    with pytest.raises(ValueError, match="angle_sigma/box_sigma"):
        NumberTargets.from_tokenizer(Digits(), 3.0, 0)
    NumberTargets.from_tokenizer(Digits(), 0, 0)  # both 0: nothing is asked of the tokenizer


def test_negative_sigmas_are_refused_by_name():
    with pytest.raises(ValueError, match="angle_sigma"):
        TrainConfig(angle_sigma=-1)


def test_the_soft_loss_from_the_answers_logits_alone_is_the_full_ones(backend):
    """`train.answer_loss(..., soft)` (logits only where a label follows, as `fit` computes them for
    backends that allow it) gives the soft-target loss of the full logits, on a padded batch with
    head-pose answers, so a soft-target adapter keeps the cheaper step."""
    from hpelib import train

    samples = random_samples(6)
    assert any(s.task == "hpe" for s in samples)
    batch = backend.collate([backend.encode(s) for s in samples])
    soft = NumberTargets.from_tokenizer(backend.tokenizer, 3.0, 2.0)
    full = dict(batch)
    labels = full.pop("labels")
    expected = soft.loss(backend.model(**full).logits, labels)
    torch.testing.assert_close(train.answer_loss(backend.model, batch, soft), expected)
    assert not torch.allclose(train.answer_loss(backend.model, batch), expected)  # the soft targets did count


def test_angle_tokens_weigh_angle_weight_times_the_other_labelled_tokens(backend):
    """The loss is a weighted mean: each angle's token (after ` yaw:` ...) counts `angle_weight` times,
    the box values, brackets and field names once; an answer without angles keeps its mean."""
    tok = backend.tokenizer
    answer = prompts.format_hpe((0.1, 0.2, 0.5, 0.6), -12, 5, 0)
    labels = answer_labels(tok, answer)
    logits = torch.randn(1, labels.shape[1], len(tok.get_vocab()), generator=torch.Generator().manual_seed(1))
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="none")
    tokens = tok.convert_ids_to_tokens(labels[0, 1:].tolist())
    fields = {f" {name}:" for name in ("yaw", "pitch", "roll")}
    is_angle = torch.tensor([i > 0 and tokens[i - 1] in fields for i in range(len(tokens))])
    assert [t for t, a in zip(tokens, is_angle) if a] == ["-12", "5", "0"]
    weight = 1 + 2 * is_angle.float()
    expected = (per_token * weight).sum() / weight.sum()
    got = NumberTargets.from_tokenizer(tok, 0, 0, angle_weight=3.0).loss(logits, labels)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, per_token.mean())
    box = answer_labels(tok, prompts.format_box((0.1, 0.2, 0.5, 0.6)))
    box_logits = torch.randn(1, box.shape[1], len(tok.get_vocab()), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(NumberTargets.from_tokenizer(tok, 0, 0, angle_weight=3.0).loss(box_logits, box),
                               NumberTargets.from_tokenizer(tok, 0, 0).loss(box_logits, box))


def test_an_angle_weight_is_refused_where_it_cannot_apply():
    class Digits:
        def get_vocab(self):
            return {str(i): i for i in range(10)} | {"-": 10, " yaw:": 11}

    with pytest.raises(ValueError, match="angle_weight"):
        NumberTargets.from_tokenizer(Digits(), 0, 0, angle_weight=2.0)
    for bad in (0, -1.0, True):
        with pytest.raises(ValueError, match="angle_weight"):
            TrainConfig(angle_weight=bad)


def test_an_angle_weight_is_a_new_base_and_leaves_cached_bases_keys_alone():
    from hpelib import train
    from hpelib.config import make_config

    assert train.base_key(make_config("default", {"base.angle_weight": 1.0})) == "d33d04b1667d"
    assert train.base_key(make_config("default", {"base.angle_weight": 2.0})) != "d33d04b1667d"
