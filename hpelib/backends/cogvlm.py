"""The `cogvlm` backend: the paper's model, `THUDM/cogvlm-grounding-generalist-hf`, through its remote code.

- **Remote code, opt-in only.** CogVLM's classes live in the checkpoint (`modeling_cogvlm.py`,
  `visual.py`), so transformers must run code downloaded with the weights. That happens only when
  `config.model.trust_remote_code` is true (`-p model.trust_remote_code true`); otherwise `build`
  and `load` raise a `ValueError` that says why. Weights are read from safetensors only.
- **Older stack.** The remote code imports torchvision and xformers and was written for
  transformers 4.3x-4.41; use `environment-cogvlm.yml` (transformers < 4.42), not the main env.
- **Prompts** come from the model's own `build_conversation_input_ids(tokenizer, query=...,
  images=[PIL image], template_version="base")`: BOS, the image's placeholder tokens (token type 1,
  `(490 / 14)^2 + 2` of them), then the query as plain text (the `base` template, which the grounding
  generalist was trained with). The answer and EOS follow; labels are -100 except there.
  CogVLM's grounding boxes are already this project's `[[x0,y0,x1,y1]]` grammar (000-999).
- **Tokenizer**: Vicuna-7B v1.5's (`lmsys/vicuna-7b-v1.5`; `model.tokenizer_id` changes it).
- **LoRA** targets the visual-expert decoder's linears by full path. Bare suffixes would be wrong:
  the EVA-CLIP vision tower (`model.vision.transformer.layers.N.attention.{query_key_value,dense}`,
  `.mlp.{fc1,fc2}`) and its GLU adapter (`model.vision.linear_proj.{linear_proj,gate_proj,
  dense_h_to_4h,dense_4h_to_h}`) reuse `query_key_value`, `dense` and `gate_proj`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpelib.backends import hub
from hpelib.backends.base import Backend, Sample

MODEL_ID = "THUDM/cogvlm-grounding-generalist-hf"
TOKENIZER_ID = "lmsys/vicuna-7b-v1.5"
TEMPLATE_VERSION = "base"
LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1  # as in modeling_cogvlm.py
BACKEND_FILE = "hpelib_backend.json"

# Decoder layer N of CogVLMModel (modeling_cogvlm.py): self_attn = VisionExpertAttention with
# {language,vision}_expert_{query_key_value,dense}; mlp = VisionExpertMLP with {language,vision}_mlp.
# {gate,up,down}_proj. The language experts handle text tokens, the vision experts image tokens.
_LAYER = r"(?:.*\.)?model\.layers\.\d+\."
LANGUAGE_RE = _LAYER + r"(?:self_attn\.language_expert_(?:query_key_value|dense)|mlp\.language_mlp\.(?:gate|up|down)_proj)"
VISION_RE = _LAYER + r"(?:self_attn\.vision_expert_(?:query_key_value|dense)|mlp\.vision_mlp\.(?:gate|up|down)_proj)"
# the projector (`target_projector`): the GLU adapter between the EVA-CLIP tower and the decoder
PROJECTOR_RE = r"(?:.*\.)?model\.vision\.linear_proj\.(?:linear_proj|dense_h_to_4h|gate_proj|dense_4h_to_h)"


def require_remote_code(trust_remote_code: bool, model_id: str) -> None:
    """Refuse to run a checkpoint's own Python code unless the user said so.

    Raises:
        ValueError: `trust_remote_code` is not True; the message names the parameter to set.
    """
    if trust_remote_code is not True:
        raise ValueError(
            f"the cogvlm backend runs Python code shipped with {model_id!r} (modeling_cogvlm.py, visual.py): "
            "CogVLM is not a transformers class, so from_pretrained must be told trust_remote_code=True. "
            "That code runs with your user's rights, so it is off unless you turn it on: read it on the "
            "model's hub page, then set -p model.trust_remote_code true (or the notebook parameter / "
            "override {'model.trust_remote_code': True}). It also needs the older stack in environment-cogvlm.yml.")


class CogVLMBackend(Backend):
    """CogVLM grounding generalist (`model.backend = "cogvlm"`), bf16 on one GPU (~36 GB of weights).

    `processor` and `tokenizer` are the Vicuna tokenizer; images are prepared by the model's own
    `build_conversation_input_ids` (490 px, CLIP normalisation).
    """

    name = "cogvlm"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, source: str = "",
                 template_version: str = TEMPLATE_VERSION, tokenizer_source: str = TOKENIZER_ID):
        super().__init__(model, tokenizer)
        self.tokenizer = tokenizer
        self.source = source
        self.tokenizer_source = tokenizer_source
        self.template_version = template_version
        if getattr(tokenizer, "pad_token_id", None) is None:  # Vicuna pads with <unk> (id 0)
            tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id
        vision = getattr(getattr(model, "model", None), "vision", None)
        if isinstance(vision, torch.nn.Module):  # a trainer may hand over float32 images to a bf16 model
            vision.register_forward_pre_hook(_cast_images)

    # ---- building and persistence -----------------------------------------------------------
    @classmethod
    def build(cls, config) -> "CogVLMBackend":
        """The pretrained CogVLM `config.model.model_id` (remote code: only with
        `config.model.trust_remote_code`), its tokenizer `config.model.tokenizer_id` or Vicuna's."""
        m = config.model
        device = hub.resolve_device(m.device)
        return cls._load(m.model_id, device, hub.resolve_dtype(m.dtype, device),
                         trust_remote_code=m.trust_remote_code, tokenizer_id=m.tokenizer_id or TOKENIZER_ID,
                         load_in_4bit=m.load_in_4bit, gradient_checkpointing=m.gradient_checkpointing)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", dtype: str | None = None, *,
             trust_remote_code: bool = False, tokenizer_id: str | None = None, load_in_4bit: bool = False,
             gradient_checkpointing: bool = False) -> "CogVLMBackend":
        """A folder written by `save` (its tokenizer is saved beside it), or a hub id. The folder's
        copy of the remote code runs only with `trust_remote_code=True`."""
        dev = hub.resolve_device(device)
        folder = Path(path)
        if tokenizer_id is None:
            tokenizer_id = str(folder) if (folder / "tokenizer_config.json").exists() else TOKENIZER_ID
        return cls._load(path, dev, hub.resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code,
                         tokenizer_id=tokenizer_id, load_in_4bit=load_in_4bit,
                         gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def _load(cls, model_id, device: torch.device, dtype: torch.dtype, *, trust_remote_code: bool,
              tokenizer_id: str, load_in_4bit: bool, gradient_checkpointing: bool) -> "CogVLMBackend":
        require_remote_code(trust_remote_code, str(model_id))  # before anything is read or fetched
        source = hub.resolve_source(model_id)
        tok_source = hub.resolve_source(tokenizer_id)
        from transformers import AutoModelForCausalLM

        try:
            from transformers import LlamaTokenizer  # the official demo's (slow, sentencepiece) tokenizer

            tokenizer = LlamaTokenizer.from_pretrained(tok_source.ref, local_files_only=tok_source.local)
        except Exception as e:  # noqa: BLE001
            raise hub.load_error("Vicuna tokenizer (set -p model.tokenizer_id)", tok_source, e) from e
        kwargs = hub.from_pretrained_kwargs(source, dtype=dtype, device=device, load_in_4bit=load_in_4bit,
                                            trust_remote_code=True)
        try:
            model = AutoModelForCausalLM.from_pretrained(source.ref, low_cpu_mem_usage=True, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise hub.load_error("CogVLM model (remote code; environment-cogvlm.yml)", source, e) from e
        if gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False):
            hub.enable_gradient_checkpointing(model)
        elif gradient_checkpointing:
            warnings.warn("model.gradient_checkpointing is set but this CogVLM remote code does not support "
                          "gradient checkpointing; training keeps all activations (use a smaller "
                          "lora.train.batch_size with a larger grad_accum, see docs/real_backends.md)", stacklevel=2)
        return cls(model.eval(), tokenizer, source=source.ref, tokenizer_source=tok_source.ref)

    def save(self, path: str | os.PathLike) -> Path:
        """Weights as safetensors (with the remote code files transformers copies beside them) and
        the tokenizer, so `load(path, trust_remote_code=True)` needs nothing else."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / BACKEND_FILE).write_text(json.dumps(
            {"backend": self.name, "source": self.source, "tokenizer": self.tokenizer_source,
             "template_version": self.template_version}, indent=2))
        return path

    # ---- data -------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """`input_ids`, `token_type_ids`, `attention_mask` `(L,)` from the model's
        `build_conversation_input_ids` (base template), `images` `(1, 3, S, S)`; with an answer, its
        tokens and EOS are appended (token type 0) and `labels` `(L,)` is -100 before them."""
        from PIL import Image

        image = Image.fromarray(np.asarray(sample.image, dtype=np.uint8)[..., :3])
        built = self.model.build_conversation_input_ids(
            self.tokenizer, query=sample.prompt, images=[image], template_version=self.template_version)
        out = {
            "input_ids": torch.as_tensor(built["input_ids"], dtype=torch.long),
            "token_type_ids": torch.as_tensor(built["token_type_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(built["attention_mask"], dtype=torch.long),
            "images": torch.as_tensor(built["images"][0]).unsqueeze(0),
        }
        if sample.answer is not None:
            answer = self.tokenizer.encode(sample.answer, add_special_tokens=False) + [self.eos_id]
            answer = torch.tensor(answer, dtype=torch.long)
            n_prompt = out["input_ids"].numel()
            out["input_ids"] = torch.cat([out["input_ids"], answer])
            out["token_type_ids"] = torch.cat([out["token_type_ids"], torch.full_like(answer, LANGUAGE_TOKEN_TYPE)])
            out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(answer)])
            out["labels"] = torch.cat([torch.full((n_prompt,), -100, dtype=torch.long), answer])
        return out

    def collate(self, encoded: list[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad the token rows (`token_type_ids` with the language type, `labels` with -100) and stack
        `images` to `(B, 1, 3, S, S)`: the remote code iterates images as one list per sample."""
        rows = lambda key: [e[key] for e in encoded]  # noqa: E731
        batch = {
            "input_ids": hub.pad(rows("input_ids"), self.pad_id, padding_side),
            "token_type_ids": hub.pad(rows("token_type_ids"), LANGUAGE_TOKEN_TYPE, padding_side),
            "attention_mask": hub.pad(rows("attention_mask"), 0, padding_side),
            "images": torch.stack(rows("images")),
        }
        if all("labels" in e for e in encoded):
            batch["labels"] = hub.pad(rows("labels"), -100, padding_side)
        return batch

    def generate(self, samples: list[Sample], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers with the KV cache, left-padded batches; the prompt is cut off."""
        return hub.greedy_generate(self, samples, max_new_tokens, image_key="images", eos_id=self.eos_id)

    # ---- LoRA -------------------------------------------------------------------------------
    def lora_target_modules(self, language: bool = True, vision: bool = False, projector: bool = False) -> str:
        """Regex over module names: the language experts of every decoder layer (`language`) and
        the vision experts (`vision`), each attention's `*_expert_query_key_value`/`*_expert_dense`
        and MLP's `gate/up/down_proj`; the GLU adapter's four linears only when asked (`projector`).
        Never the EVA-CLIP tower or `lm_head`."""
        return hub.join_regex(([LANGUAGE_RE] if language else []) + ([VISION_RE] if vision else [])
                              + ([PROJECTOR_RE] if projector else []))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _cast_images(module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of the EVA-CLIP tower: floating inputs in the tower's parameter dtype."""
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
