"""The backend protocol every VLM implements, so training, merging and evaluation are one code path.

A backend wraps a real `transformers` model and its processor. It knows how to turn a
`Sample` (image + prompt + answer) into model inputs with the loss on answer tokens only, how to
collate, how to generate answers, which module names LoRA should target, and how to save and
load itself (safetensors only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass
class Sample:
    """One training or evaluation example.

    image: `(H, W, 3)` uint8 RGB.
    prompt: the question, e.g. `prompts.HPE_PROMPT`.
    answer: the target text (`None` at generation time).
    task: `"hpe"`, `"box"` (grounding), or another base-curriculum task name.
    meta: labels kept beside the text (yaw, pitch, roll, box, domain, ...).
    """

    image: np.ndarray
    prompt: str
    answer: str | None = None
    task: str = "hpe"
    meta: dict[str, Any] = field(default_factory=dict)


class Backend:
    """Base class of the VLM backends. Subclasses set `name` and implement the methods below."""

    name: ClassVar[str] = ""
    # The model's forward takes a boolean `logits_to_keep` mask (transformers' `slice_logits_to_keep`),
    # so training projects onto the vocabulary only where a label follows (`train.answer_loss`)
    answer_logits_only: ClassVar[bool] = False

    def __init__(self, model: torch.nn.Module, processor: Any):
        self.model = model
        self.processor = processor

    # ---- building and persistence -----------------------------------------------------------
    @classmethod
    def build(cls, config) -> "Backend":
        """A fresh model for `config` (a `hpelib.config.Config`): random init or pretrained by id."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "Backend":
        """Load what `save` wrote (safetensors weights only)."""
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Path:
        """Write model and processor with `save_pretrained(safe_serialization=True)`."""
        raise NotImplementedError

    # ---- data -------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """Model inputs for one sample; `labels` is -100 everywhere but on the answer tokens."""
        raise NotImplementedError

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Pad and stack `encode` outputs into one batch."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers (KV cache on) for a batch of samples; `answer` is ignored."""
        raise NotImplementedError

    # ---- LoRA -------------------------------------------------------------------------------
    def lora_target_modules(self, language: bool = True, vision: bool = True, projector: bool = False) -> str:
        """A regular expression over module names (PEFT `target_modules`) selecting the linear
        layers LoRA adapts: the language model's attention/MLP projections and/or the vision
        tower's, and/or the projector's between them."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


_REGISTRY: dict[str, str] = {
    "tiny": "hpelib.backends.tiny:TinyBackend",
    "qwen2_vl": "hpelib.backends.qwen2_vl:Qwen2VLBackend",
    "cogvlm": "hpelib.backends.cogvlm:CogVLMBackend",
}


def get_backend_class(name: str) -> type[Backend]:
    """The backend class registered under `name` (imported lazily)."""
    if name not in _REGISTRY:
        raise ValueError(f"model.backend must be one of {sorted(_REGISTRY)}, got {name!r}")
    import importlib

    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as e:
        raise ValueError(f"backend {name!r} is not available yet ({e})") from None
