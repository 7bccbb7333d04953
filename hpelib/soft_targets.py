"""Soft targets for number tokens: the training loss sees that 41 is closer to 40 than 90 is.

With one token per number (the tiny backend), the language-model loss treats an angle or a box
value as a class among hundreds: predicting `yaw:41` for a true `yaw:40` costs as much as
predicting `yaw:-90`. `NumberTargets` replaces the one-hot target of each number token by a
Gaussian over the tokens of the same field, `exp(-(v - v_true)^2 / (2 sigma^2))`, normalised (the
label-smoothing-by-distance of classification-as-regression models). Greedy decoding still reads
the most likely token, so the answer grammar is unchanged.

Two kinds of numbers, told apart by the token before them in the label sequence:
- **angles**: the number after a field token (` yaw:`, ` pitch:`, ` roll:`, ` tilt:`); the
  neighbours are the signed tokens `-180`..`180` (without `-0`), at distance |v - v_true| in degrees
  (no wrap: the rendered angles stay well inside +-180).
- **box values**: a 3-digit token (`000`-`999`) after `[[` or `,`; neighbours are the 3-digit tokens,
  at distance |v - v_true| in grid units of the 0-999 location grid.
Every other labelled token keeps its one-hot target. With both sigmas 0 the loss is the model's own
cross-entropy.

`angle_weight` (`train.angle_weight`) weighs each angle's token that many times the other labelled
tokens (a weighted mean): a head-pose answer has 16 labelled tokens, 3 of them angles; in an 8-minute
tiny adapter they carried 40 % of the loss, the 4 box values 29 %, the field names 31 %
(docs/tiny_backend.md, "Attention that costs less").

Only tokenizers with whole-number tokens can use this: a digit-per-token tokenizer (the hub
models) has no token for 41, and `NumberTargets.from_tokenizer` raises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ANGLE_FIELDS = ("yaw", "pitch", "roll", "tilt")
SIGNED_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,2})")
THREE_DIGITS = re.compile(r"[0-9]{3}")
MAX_ANGLE = 180


def number_tokens_by_kind(vocab: dict[str, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """`(angles, boxes)`: the `(value, token id)` pairs, sorted by value, of the signed angle tokens
    (`-180`..`180`, without `-0`) and of the 3-digit box-value tokens (`000`..`999`) in `vocab`."""
    angles = sorted((int(t), i) for t, i in vocab.items()
                    if SIGNED_NUMBER.fullmatch(t) and t != "-0" and abs(int(t)) <= MAX_ANGLE)
    boxes = sorted((int(t), i) for t, i in vocab.items() if THREE_DIGITS.fullmatch(t))
    return angles, boxes


def _kernel(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Row i: the normalised Gaussian weights of every value around values[i]."""
    d = values[:, None] - values[None, :]
    k = torch.exp(-(d.float() ** 2) / (2.0 * sigma ** 2))
    return k / k.sum(dim=1, keepdim=True)


@dataclass
class NumberTargets:
    """The soft-target tables of one tokenizer (see the module docstring).

    Attributes:
        field_ids: token ids after which a number is an angle.
        box_open_ids: token ids after which a 3-digit number is a box value (`[[`, `,`).
        angle_ids / box_ids: the neighbour tokens of each kind, in order of value.
        angle_index / box_index: vocabulary id -> position in angle_ids / box_ids (-1: not of the kind).
        angle_kernel / box_kernel: row j is the target distribution over the kind's tokens when the
            label is the kind's j-th token (None when that sigma is 0).
        angle_weight: the weight of an angle's token in the mean over labelled tokens (others: 1).
    """

    field_ids: torch.Tensor
    box_open_ids: torch.Tensor
    angle_ids: torch.Tensor
    box_ids: torch.Tensor
    angle_index: torch.Tensor
    box_index: torch.Tensor
    angle_kernel: torch.Tensor | None
    box_kernel: torch.Tensor | None
    angle_weight: float = 1.0

    @classmethod
    def from_tokenizer(cls, tokenizer, angle_sigma: float, box_sigma: float,
                       angle_weight: float = 1.0) -> "NumberTargets":
        """Tables for `tokenizer`; `angle_sigma` in degrees, `box_sigma` in grid units (0: one-hot),
        `angle_weight` the angle tokens' weight in the loss (1: as every other token)."""
        vocab = tokenizer.get_vocab()
        angles, boxes = number_tokens_by_kind(vocab)
        if ((angle_sigma > 0 or angle_weight != 1) and len(angles) < 361) or (box_sigma > 0 and len(boxes) < 1000):
            raise ValueError(
                f"angle_sigma/box_sigma > 0 and angle_weight != 1 need a tokenizer with one token per number "
                f"(-180..180 and 000..999); this one has {len(angles)} angle and {len(boxes)} box-value tokens. "
                f"Set them to 0 (the weight to 1) for this backend.")
        fields = [vocab[t] for name in ANGLE_FIELDS for t in (f" {name}:", f"{name}:") if t in vocab]
        opens = [vocab[t] for t in ("[[", ",") if t in vocab]
        size = max(vocab.values()) + 1

        def index(pairs):
            idx = torch.full((size,), -1, dtype=torch.long)
            idx[torch.tensor([i for _, i in pairs], dtype=torch.long)] = torch.arange(len(pairs))
            return idx

        return cls(
            field_ids=torch.tensor(fields, dtype=torch.long), box_open_ids=torch.tensor(opens, dtype=torch.long),
            angle_ids=torch.tensor([i for _, i in angles], dtype=torch.long),
            box_ids=torch.tensor([i for _, i in boxes], dtype=torch.long),
            angle_index=index(angles), box_index=index(boxes),
            angle_kernel=_kernel(torch.tensor([v for v, _ in angles]), angle_sigma) if angle_sigma > 0 else None,
            box_kernel=_kernel(torch.tensor([v for v, _ in boxes]), box_sigma) if box_sigma > 0 else None,
            angle_weight=float(angle_weight))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over labelled tokens of the cross-entropy against the soft targets (angle tokens
        weighted `angle_weight` times).

        Args:
            logits: `(B, L, V)`, the model's output for `input_ids`.
            labels: `(B, L)`, -100 where there is no loss (the model's own convention: position t
                predicts labels[t + 1]).
        """
        target = labels[:, 1:]
        keep = target != -100
        return self.loss_at(logits[:, :-1][keep], labels, keep)

    def loss_at(self, logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """`loss` from the logits of the labelled positions only (`train.answer_loss`).

        Args:
            logits: `(N, V)`, the logits at the positions `keep` selects, in order.
            labels: `(B, L)`, as for `loss`.
            keep: `(B, L - 1)` boolean, `labels[:, 1:] != -100`.
        """
        log_p = F.log_softmax(logits.float(), dim=-1)  # (N, V)
        target, before = labels[:, 1:][keep], labels[:, :-1][keep]
        per_token = -log_p.gather(1, target[:, None]).squeeze(1)
        weight = torch.ones_like(per_token)
        for kernel, ids, index, opens, kind_weight in (
                (self.angle_kernel, self.angle_ids, self.angle_index, self.field_ids, self.angle_weight),
                (self.box_kernel, self.box_ids, self.box_index, self.box_open_ids, 1.0)):
            if kernel is None and kind_weight == 1:
                continue
            index, ids = index.to(target.device), ids.to(target.device)
            j = index[target.clamp(min=0, max=len(index) - 1)]
            at = (j >= 0) & torch.isin(before, opens.to(target.device))  # this kind's number tokens
            weight[at] = kind_weight
            if kernel is not None and at.any():
                per_token[at] = -(kernel.to(log_p.device)[j[at]] * log_p[at][:, ids]).sum(dim=1)
        if self.angle_weight == 1:
            return per_token.mean()
        return (per_token * weight).sum() / weight.sum()
