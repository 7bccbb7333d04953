"""The `qwen2_vl` backend: any `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`
by hub id (e.g. `Qwen/Qwen2-VL-2B-Instruct`) or local folder, natively in transformers 5.

- **Model class** from the checkpoint's own `config.json` (`model_type` `qwen2_vl` or `qwen2_5_vl`);
  safetensors only, never remote code; bf16 on GPU; NF4 4-bit on request (bitsandbytes).
- **Processor**: the model's own (`AutoProcessor`: image processor, tokenizer, chat template). In
  transformers 5 `Qwen2VLProcessor` insists on a video processor, which needs torchvision; where
  torchvision is missing (as here) the same processor is assembled without video
  (`ImageOnlyQwen2VLProcessor`): same image processor, tokenizer, template and token expansion.
- **Inputs**: the chat template around one image and the prompt, then the answer and `<|im_end|>`;
  labels are -100 except on those answer tokens. transformers 5 computes the multimodal RoPE
  positions from `mm_token_type_ids` (0 text, 1 image; `Qwen2VLModel.compute_3d_position_ids`
  raises without it), which the processor returns; answer tokens extend it with zeros.
- **LoRA**: the language model's `q/k/v/o_proj` and `gate/up/down_proj`, anchored on
  `language_model.layers.N` because Qwen2.5-VL's vision blocks also have `gate/up/down_proj`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from transformers import AutoConfig, AutoProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from hpelib.backends import hub
from hpelib.backends.base import Backend, Sample

# model_type in config.json -> (model class name, processor class name), all in transformers 5
MODEL_TYPES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    # the embedded tiny backend's class; real Qwen3-VL hub folders are untested here (no weights)
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}
BACKEND_FILE = "hpelib_backend.json"
END_OF_TURN = "<|im_end|>"

# LoRA targets (PEFT `re.fullmatch`es the full module name). transformers 5 names the decoder
# `model.language_model.layers.N` (4.4x: `model.layers.N`) and the vision tower `model.visual.blocks.N`.
LANGUAGE_RE = (r"(?:.*\.)?(?:language_model|model)\.layers\.\d+\."
               r"(?:self_attn\.(?:q|k|v|o)_proj|mlp\.(?:gate|up|down)_proj)")
# Qwen2-VL vision MLP: fc1/fc2; Qwen2.5-VL: gate/up/down_proj; Qwen3-VL: linear_fc1/2. The patch
# merger (Qwen3-VL: and its deepstack mergers) is not a vision block: PROJECTOR_RE below.
VISION_RE = (r"(?:.*\.)?visual\.blocks\.\d+\."
             r"(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2|linear_fc1|linear_fc2|gate_proj|up_proj|down_proj))")
# The projector (`target_projector`): Qwen2-VL's and Qwen2.5-VL's patch merger `visual.merger.mlp.{0,2}`
# (1 is its GELU), Qwen3-VL's `visual.merger.linear_fc1/2` and its deepstack mergers
# `visual.deepstack_merger_list.N.linear_fc1/2`.
PROJECTOR_RE = r"(?:.*\.)?visual\.(?:merger|deepstack_merger_list\.\d+)\.(?:mlp\.[02]|linear_fc1|linear_fc2)"


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, for transformers 5 without torchvision.

    Images, the tokenizer, the chat template and the `<|image_pad|>` expansion (one pad per merged
    2 x 2 patch group) are exactly the parent's; only video input is unavailable. `save` records the
    model's real processor class, so the folder stays loadable by `AutoProcessor` elsewhere.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def load_processor(source: hub.Source) -> ProcessorMixin:
    """The checkpoint's own processor; the image-only assembly where `AutoProcessor` cannot build it."""
    kwargs = dict(local_files_only=source.local)
    first: BaseException | None = None
    try:
        processor = AutoProcessor.from_pretrained(source.ref, **kwargs)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
        first = TypeError(f"AutoProcessor returned a {type(processor).__name__}, not a VLM processor")
    except Exception as e:  # noqa: BLE001 - e.g. the video processor needs torchvision
        first = e
    try:
        return ImageOnlyQwen2VLProcessor.from_pretrained(source.ref, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise hub.load_error("processor", source, RuntimeError(
            f"AutoProcessor: {type(first).__name__}: {first}; image-only processor: {type(e).__name__}: {e}")) from e


class Qwen2VLBackend(Backend):
    """A pretrained Qwen2-VL / Qwen2.5-VL (`model.backend = "qwen2_vl"`, `model.model_id = ...`).

    `processor` is the model's processor; `tokenizer` its tokenizer.
    """

    name = "qwen2_vl"
    answer_logits_only = True  # Qwen2-VL, Qwen2.5-VL and the tiny Qwen3-VL slice with slice_logits_to_keep

    def __init__(self, model: torch.nn.Module, processor: ProcessorMixin, source: str = ""):
        super().__init__(model, processor)
        self.tokenizer = processor.tokenizer
        self.source = source
        self.model_type = model.config.model_type
        end = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.end_id = end if isinstance(end, int) and end != self.tokenizer.unk_token_id else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.end_id
        gc = model.generation_config
        gc.pad_token_id = self.pad_id
        gc.eos_token_id = self.end_id

    # ---- building and persistence -----------------------------------------------------------
    @classmethod
    def build(cls, config) -> "Qwen2VLBackend":
        """The pretrained model `config.model.model_id` on `config.model.device`, in `config.model.dtype`."""
        m = config.model
        device = hub.resolve_device(m.device)
        return cls._load(m.model_id, device, hub.resolve_dtype(m.dtype, device), load_in_4bit=m.load_in_4bit,
                         gradient_checkpointing=m.gradient_checkpointing)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
             load_in_4bit: bool = False, gradient_checkpointing: bool = False) -> "Qwen2VLBackend":
        """A folder written by `save` (or any hub id / folder of the two classes). `dtype=None`:
        bfloat16 on CUDA, float32 elsewhere."""
        dev = hub.resolve_device(device)
        return cls._load(path, dev, hub.resolve_dtype(dtype, dev), load_in_4bit=load_in_4bit,
                         gradient_checkpointing=gradient_checkpointing)

    @classmethod
    def _load(cls, model_id, device: torch.device, dtype: torch.dtype, *, load_in_4bit: bool,
              gradient_checkpointing: bool) -> "Qwen2VLBackend":
        source = hub.resolve_source(model_id)
        try:
            model_config = AutoConfig.from_pretrained(source.ref, local_files_only=source.local)
        except Exception as e:  # noqa: BLE001
            raise hub.load_error("model config", source, e) from e
        model_type = model_config.model_type
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source.describe()} is a {model_type!r} model; the qwen2_vl backend reads "
                             f"{sorted(MODEL_TYPES)} (for CogVLM set -p model.backend cogvlm)")
        import transformers

        model_cls = getattr(transformers, MODEL_TYPES[model_type][0])
        kwargs = hub.from_pretrained_kwargs(source, dtype=dtype, device=device, load_in_4bit=load_in_4bit)
        try:
            model = model_cls.from_pretrained(source.ref, config=model_config, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise hub.load_error(f"{model_cls.__name__} weights", source, e) from e
        if gradient_checkpointing:
            hub.enable_gradient_checkpointing(model)
        return cls(model.eval(), load_processor(source), source=source.ref)

    def save(self, path: str | os.PathLike) -> Path:
        """Model (`model.safetensors`), processor, tokenizer, chat template, and the source id."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        if isinstance(self.processor, ImageOnlyQwen2VLProcessor):
            _record_processor_class(path, MODEL_TYPES[self.model_type][1])
        (path / BACKEND_FILE).write_text(json.dumps({"backend": self.name, "source": self.source}, indent=2))
        return path

    # ---- data -------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        """The chat template around one image and `prompt`, ending where the assistant answers."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """One sample: `input_ids`, `attention_mask`, `mm_token_type_ids` `(L,)`; `pixel_values`
        `(patches, 3 * 2 * 14 * 14)` and `image_grid_thw` `(1, 3)`; with an answer, the answer tokens
        and `<|im_end|>` follow the prompt and `labels` `(L,)` is -100 on everything before them."""
        image = np.asarray(sample.image, dtype=np.uint8)[..., :3]
        inputs = self.processor(text=[self.prompt_text(sample.prompt)], images=[image], return_tensors="pt")
        out = {
            "input_ids": inputs["input_ids"][0],
            "attention_mask": inputs["attention_mask"][0],
            "mm_token_type_ids": inputs["mm_token_type_ids"][0].long(),
            "pixel_values": inputs["pixel_values"],
            "image_grid_thw": inputs["image_grid_thw"],
        }
        if sample.answer is not None:
            out = self.append_answer(out, sample.answer)
        return out

    def append_answer(self, prompt_inputs: dict[str, torch.Tensor], answer: str) -> dict[str, torch.Tensor]:
        """`prompt_inputs` with the answer's tokens and `<|im_end|>` after the prompt, and `labels`
        (-100 on the prompt)."""
        ids = torch.tensor(self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.end_id],
                           dtype=torch.long)
        out = dict(prompt_inputs)
        n_prompt = out["input_ids"].numel()
        out["input_ids"] = torch.cat([out["input_ids"], ids])
        out["attention_mask"] = torch.cat([out["attention_mask"], torch.ones_like(ids)])
        out["mm_token_type_ids"] = torch.cat([out["mm_token_type_ids"], torch.zeros_like(ids)])
        out["labels"] = torch.cat([torch.full((n_prompt,), -100, dtype=torch.long), ids])
        return out

    def collate(self, encoded: list[dict[str, torch.Tensor]], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad the token rows (`input_ids` with the pad id, masks with 0, `labels` with -100) and
        concatenate the images' patches `(sum patches, D)` and grids `(B, 3)`.
        Generation pads on the left so every row's answer starts at the same column."""
        rows = lambda key: [e[key] for e in encoded]  # noqa: E731
        batch = {
            "input_ids": hub.pad(rows("input_ids"), self.pad_id, padding_side),
            "attention_mask": hub.pad(rows("attention_mask"), 0, padding_side),
            "mm_token_type_ids": hub.pad(rows("mm_token_type_ids"), 0, padding_side),
            "pixel_values": torch.cat(rows("pixel_values")),
            "image_grid_thw": torch.cat(rows("image_grid_thw")),
        }
        if all("labels" in e for e in encoded):
            batch["labels"] = hub.pad(rows("labels"), -100, padding_side)
        return batch

    def generate(self, samples: list[Sample], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers (KV cache on), batched with left padding; the prompt is cut off."""
        return hub.greedy_generate(self, samples, max_new_tokens, image_key="pixel_values", eos_id=self.end_id)

    # ---- LoRA -------------------------------------------------------------------------------
    def lora_target_modules(self, language: bool = True, vision: bool = False, projector: bool = False) -> str:
        """Regex over module names: the decoder layers' attention and MLP projections (`language`),
        and only when asked the vision blocks' `attn.qkv`/`attn.proj` and MLP linears (`vision`) and
        the patch merger's linears (`projector`, with Qwen3-VL's deepstack mergers). Never `lm_head`
        or the embeddings."""
        return hub.join_regex(([LANGUAGE_RE] if language else []) + ([VISION_RE] if vision else [])
                              + ([PROJECTOR_RE] if projector else []))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def _record_processor_class(path: Path, name: str) -> None:
    """Write the model's real processor class into the saved configs (instead of the image-only one)."""
    for f in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        p = path / f
        if p.exists():
            d = json.loads(p.read_text())
            if d.get("processor_class") == ImageOnlyQwen2VLProcessor.__name__:
                d["processor_class"] = name
                p.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ tiny stand-in
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's template, reduced to what this project sends: one user turn of image + text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_PRETOKEN = r"\[\[|\]\]|[A-Za-z]+|[0-9]{1,3}|\s|[^\sA-Za-z0-9]"


def write_tiny_checkpoint(folder: str | os.PathLike, corpus: Iterable[str] = (), model_type: str = "qwen2_vl",
                          seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """A randomly initialised Qwen2-VL (or Qwen2.5-VL) of toy size, saved like a hub checkpoint.

    The real classes and module names at ~0.3 M parameters, with a word-level tokenizer built in
    code (the Qwen special tokens, `000`-`999`, ASCII punctuation and the words of `corpus`), the
    chat template and the pure-numpy image processor (14 px patches, 2 x 2 merge; 28-112 px images).
    For tests and smoke runs where no real weights exist: `-p model.model_id <folder>`.
    """
    import re

    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(MODEL_TYPES)}, got {model_type!r}")
    vocab: dict[str, int] = {}
    words = list(SPECIAL_TOKENS) + ["user", "assistant", "system", "[[", "]]"]
    words += [str(i) for i in range(1000)] + [f"{i:03d}" for i in range(100)] + [f"{i:02d}" for i in range(10)]
    words += list(" !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n\t")
    words += sorted({w for text in corpus for w in re.findall(_PRETOKEN, text)})
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKEN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TURN, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), clean_up_tokenization_spaces=False)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=112 * 112)
    processor = ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=CHAT_TEMPLATE)

    ids = {t: vocab[t] for t in SPECIAL_TOKENS}
    heads = 4
    text = dict(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                max_position_embeddings=1024, bos_token_id=None, eos_token_id=ids[END_OF_TURN],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [hidden_size // heads // 8] * 2 + [hidden_size // heads // 4]})
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if model_type == "qwen2_vl":
        vision = dict(depth=layers, embed_dim=32, hidden_size=hidden_size, num_heads=2, mlp_ratio=2)
        config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **special)
    else:
        vision = dict(depth=layers, hidden_size=32, out_hidden_size=hidden_size, num_heads=2, intermediate_size=64,
                      fullatt_block_indexes=list(range(layers)))
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_TYPES[model_type][0])(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids[END_OF_TURN]
    model.generation_config.bos_token_id = None

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _record_processor_class(folder, MODEL_TYPES[model_type][1])  # as a hub checkpoint names it
    return folder
