"""The embedded `tiny` backend: a real `transformers` VLM at toy size that learns on a CPU in minutes.

Design (chosen by experiment, see `docs/tiny_backend.md`):

- **Model**: `transformers.Florence2ForConditionalGeneration`, randomly initialised from a small
  config. Its vision tower is DaViT: convolutional patch embeddings and a hierarchical,
  CNN-like layout (strides 4, 2, 2, 2), which learns from few samples far faster than a plain
  ViT. The last feature map (`(S/32)^2` cells, 4 x 4 at 128 px) plus one pooled token are the image
  tokens; a BART encoder reads them with the prompt and a BART decoder writes the answer.
- **Tokenizer**, built in code with `tokenizers` and wrapped as `PreTrainedTokenizerFast`: a
  word-level vocabulary in which every number of the answer grammar is ONE token (`000`-`999`,
  `0`-`999`, `-0`-`-180`), so the box corners and the angles are classification over bins (as in
  Pix2Seq) instead of digit-by-digit regression. The answer *string* is exactly the grammar of
  `hpelib.prompts`: tokens decode by plain concatenation (`decoders.Fuse`).
- **Image processor**: numpy/torch only (torchvision is not importable here): resize to the
  configured size, scale to [0, 1], normalise.

Everything is saved with `save_pretrained` (safetensors) and loaded without remote code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import Florence2Config, Florence2ForConditionalGeneration, PreTrainedTokenizerFast
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from hpelib.backends.base import Backend, Sample

# ------------------------------------------------------------------------------------ tokenizer
# BART's special-token ids (the text side is BART): decoder_start = eos, as in BART.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<image>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

# One pre-token per grammar piece: "[[", "]]", " yaw:" (the space belongs to the field name so an
# answer is ~16 tokens), numbers of 1-3 digits with an optional minus, words, single characters.
PRETOKEN_PATTERN = r"\[\[|\]\]| ?(?:yaw|pitch|roll|tilt|depth):|-?[0-9]{1,3}| ?[A-Za-z]+|\s|[^\sA-Za-z0-9]"
_PRETOKEN_RE = re.compile(PRETOKEN_PATTERN)
MAX_ANGLE_TOKEN = 180  # "-0" .. "-180" are single tokens; beyond +-180 no angle is valid


def number_tokens() -> list[str]:
    """Every number string the answer grammar writes, one token each.

    `0`-`999` (angles and counts), the zero-padded box values `000`-`099` and `00`-`09` (so any
    1-3 digit string is one token), and `-0`-`-180` (negative angles; `-0` appears in decimals
    such as `-0.5`).
    """
    tokens = [str(i) for i in range(1000)]
    tokens += [f"{i:03d}" for i in range(100)] + [f"{i:02d}" for i in range(10)]
    tokens += [f"-{i}" for i in range(MAX_ANGLE_TOKEN + 1)]
    return tokens


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built from `corpus` (every prompt and answer word the tasks use).

    The vocabulary is: the special tokens, every grammar number (`number_tokens`), the printable
    ASCII punctuation, the grammar pieces (`[[`, `]]`, ` yaw:` ...) and every word of `corpus`
    (sorted, so the same corpus always gives the same ids). Unknown words map to `<unk>`.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for t in SPECIAL_TOKENS:
        add(t)
    for t in number_tokens():
        add(t)
    for c in " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n\t":
        add(c)
    for t in ("[[", "]]") + tuple(f"{s}{n}:" for n in ("yaw", "pitch", "roll", "tilt", "depth") for s in ("", " ")):
        add(t)
    # every word twice: with its leading space (inside a sentence) and without (first word, or a
    # one-word answer such as a colour)
    words = {w.strip() for text in corpus for w in _PRETOKEN_RE.findall(text) if w.strip().isalpha()}
    for w in sorted(words):
        add(w)
        add(" " + w)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces concatenate back to the exact string
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<image>"], clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------ image processor
class TinyImageProcessor(BaseImageProcessor):
    """Images `(H, W, 3)` uint8 -> `pixel_values` `(B, 3, size, size)` float32, normalised.

    numpy/torch only: bilinear resize (antialiased) when the image is not `size` x `size`.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, size: int = 128, image_mean: Sequence[float] = (0.5, 0.5, 0.5),
                 image_std: Sequence[float] = (0.25, 0.25, 0.25), **kwargs):
        super().__init__(**kwargs)
        self.size = int(size)
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def preprocess(self, images, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8)[..., :3] for im in images]))
        x = batch.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
        if x.shape[-2:] != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                                align_corners=False, antialias=True)
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return BatchFeature({"pixel_values": (x - mean) / std}, tensor_type=None)


# ------------------------------------------------------------------------------------ the model
@dataclass
class TinySpec:
    """Sizes of the tiny Florence-2 (the numbers the experiments in docs/tiny_backend.md chose).

    ~5 M parameters: a 4-stage DaViT (channels 32-256) and a 2+2-layer BART of width 256.
    At 128 px the vision tower leaves a 4 x 4 map: 16 + 1 pooled image tokens.
    """

    embed_dim: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    depths: list[int] = field(default_factory=lambda: [1, 1, 2, 1])
    window_size: int = 8  # DaViT window attention: 8 x 8 cells (stage 1 at 128 px is 32 x 32)
    d_model: int = 256
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 512
    max_text_positions: int = 128  # image tokens + prompt, or answer: both are far shorter
    # Number tokens start from sinusoidal features of their value (Pix2Seq-style bins made
    # ordinal): with tied input/output embeddings, nearby values then get nearby logits, so a box
    # corner or an angle is learnt as a smooth function instead of 1000 unrelated classes.
    number_features: int = 64  # embedding dimensions given to the value's sinusoids (0: plain init)
    number_scale: float = 0.2  # their amplitude: norm ~1.1 (the rest of the embedding is N(0, 0.02))

    @property
    def num_stages(self) -> int:
        return len(self.embed_dim)

    def num_image_tokens(self, image_size: int) -> int:
        side = image_size // (4 * 2 ** (self.num_stages - 1))
        return side * side + 1  # the feature map plus Florence-2's pooled ("temporal") token

    def florence2_config(self, vocab_size: int) -> Florence2Config:
        n = self.num_stages
        heads = [max(1, d // 32) for d in self.embed_dim]
        vision = dict(
            embed_dim=self.embed_dim, depths=self.depths, num_heads=heads, num_groups=heads,
            window_size=self.window_size, projection_dim=self.d_model, drop_path_rate=0.0,
            patch_size=[7] + [3] * (n - 1), patch_stride=[4] + [2] * (n - 1), patch_padding=[3] + [1] * (n - 1),
            patch_prenorm=[False] + [True] * (n - 1),
        )
        text = dict(
            vocab_size=vocab_size, d_model=self.d_model, encoder_layers=self.encoder_layers,
            decoder_layers=self.decoder_layers, encoder_attention_heads=self.attention_heads,
            decoder_attention_heads=self.attention_heads, encoder_ffn_dim=self.ffn_dim,
            decoder_ffn_dim=self.ffn_dim, max_position_embeddings=self.max_text_positions,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            bos_token_id=BOS_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID,
            decoder_start_token_id=EOS_ID, forced_eos_token_id=None, forced_bos_token_id=None,
        )
        return Florence2Config(vision_config=vision, text_config=text, image_token_id=IMAGE_ID)


BACKEND_FILE = "tiny_backend.json"

# LoRA targets (PEFT matches the regex against the full module name with `re.fullmatch`)
_LANGUAGE_RE = (r"(.*\.)?language_model\.(encoder|decoder)\.layers\.\d+\."
                r"(self_attn\.(q|k|v|out)_proj|encoder_attn\.(q|k|v|out)_proj|fc1|fc2)")
_VISION_RE = (r"(.*\.)?(vision_tower\.blocks\.\d+\.\d+\.(spatial_block|channel_block)\."
              r"(window_attn\.qkv|window_attn\.proj|channel_attn\.qkv|channel_attn\.proj|ffn\.fc1|ffn\.fc2)"
              r"|multi_modal_projector\.image_projection)")


class TinyBackend(Backend):
    """Florence-2 at toy size; the embedded default (`model.backend = "tiny"`).

    `processor` is the `PreTrainedTokenizerFast`; `image_processor` the `TinyImageProcessor`.
    """

    name = "tiny"

    def __init__(self, model: Florence2ForConditionalGeneration, processor: PreTrainedTokenizerFast,
                 image_processor: TinyImageProcessor, spec: TinySpec):
        super().__init__(model, processor)
        self.tokenizer = processor
        self.image_processor = image_processor
        self.spec = spec
        self.num_image_tokens = spec.num_image_tokens(image_processor.size)
        _set_generation_defaults(model)

    # ---- building and persistence -----------------------------------------------------------
    @classmethod
    def build(cls, config, spec: TinySpec | None = None, seed: int | None = None) -> "TinyBackend":
        """A randomly initialised tiny VLM for `config` (image size from `config.data.image_size`).

        The tokenizer's corpus is every prompt and answer word of `hpelib.data.tasks`.
        """
        from hpelib.data.tasks import corpus

        spec = spec or TinySpec()
        torch.manual_seed(config.seed if seed is None else seed)
        tokenizer = build_tokenizer(corpus())
        model = Florence2ForConditionalGeneration(spec.florence2_config(len(tokenizer)))
        init_number_embeddings(model, tokenizer, spec)
        model.to(dtype=getattr(torch, config.model.dtype), device=resolve_device(config.model.device))
        return cls(model, tokenizer, TinyImageProcessor(size=config.data.image_size), spec)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "TinyBackend":
        path = Path(path)
        if not (path / BACKEND_FILE).exists():
            raise FileNotFoundError(f"{path}: no {BACKEND_FILE}; not a saved tiny backend")
        spec = TinySpec(**json.loads((path / BACKEND_FILE).read_text())["spec"])
        model = Florence2ForConditionalGeneration.from_pretrained(path, use_safetensors=True)
        model.to(resolve_device(device))
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        image_processor = TinyImageProcessor.from_pretrained(path)
        return cls(model.eval(), tokenizer, image_processor, spec)

    def save(self, path: str | os.PathLike) -> Path:
        """Weights as `model.safetensors` (transformers 5 writes safetensors only), the tokenizer,
        the image processor and the tiny spec, all in `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)
        (path / BACKEND_FILE).write_text(json.dumps({"spec": dataclasses.asdict(self.spec)}, indent=2))
        return path

    # ---- data -------------------------------------------------------------------------------
    def encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        """`input_ids` = image tokens + prompt + `</s>` (the encoder's input), `pixel_values`
        `(3, S, S)`, and with an answer `labels` = answer + `</s>` (the decoder's targets: with an
        encoder-decoder every label is an answer token, so the loss is on the answer only)."""
        prompt = self.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
        ids = [IMAGE_ID] * self.num_image_tokens + prompt + [EOS_ID]
        out = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "pixel_values": self.image_processor.preprocess([sample.image])["pixel_values"][0],
        }
        if sample.answer is not None:
            answer = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
            out["labels"] = torch.tensor(answer + [EOS_ID], dtype=torch.long)
        return out

    def collate(self, encoded: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad `input_ids` (with `attention_mask`) and `labels` (with -100); stack pixels."""
        batch = {
            "input_ids": _pad([e["input_ids"] for e in encoded], PAD_ID),
            "pixel_values": torch.stack([e["pixel_values"] for e in encoded]),
        }
        batch["attention_mask"] = _pad([torch.ones_like(e["input_ids"]) for e in encoded], 0)
        if all("labels" in e for e in encoded):
            batch["labels"] = _pad([e["labels"] for e in encoded], -100)
        return batch

    @torch.no_grad()
    def generate(self, samples: list[Sample], max_new_tokens: int = 48) -> list[str]:
        """Greedy answers, batched, with the decoder's KV cache."""
        if not samples:
            return []
        model = self.model
        was_training = model.training
        model.eval()
        batch = self.collate([self.encode(Sample(s.image, s.prompt, None, s.task)) for s in samples])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             use_cache=True)
        if was_training:
            model.train()
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ---- LoRA -------------------------------------------------------------------------------
    def lora_target_modules(self, language: bool = True, vision: bool = True) -> str:
        """Regex over module names: the BART encoder/decoder attention and MLP projections
        (`language`) and the DaViT window/channel attention and MLP linears plus the image
        projection (`vision`). Convolutions stay frozen: LoRA deltas are `B @ A` of linears only."""
        parts = ([_LANGUAGE_RE] if language else []) + ([_VISION_RE] if vision else [])
        if not parts:
            raise ValueError("lora_target_modules needs language=True or vision=True")
        return "|".join(f"(?:{p})" for p in parts)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# ------------------------------------------------------------------------------------ helpers
def resolve_device(device: str) -> torch.device:
    """`"auto"` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def number_value_features(values: np.ndarray, n_features: int) -> np.ndarray:
    """Sinusoids of integer values `(N,)` -> `(N, n_features)`, wavelengths 4 to 4000 (geometric),
    so values 1 apart and 500 apart are both told apart."""
    k = n_features // 2
    wavelengths = 4.0 * 1000.0 ** (np.arange(k) / max(k - 1, 1))
    phase = 2 * np.pi * values[:, None] / wavelengths[None, :]
    return np.concatenate([np.sin(phase), np.cos(phase)], axis=1) / np.sqrt(k)


def init_number_embeddings(model, tokenizer, spec: TinySpec) -> None:
    """Write `number_scale * sinusoids(value)` into the first `number_features` dimensions of
    every number token's embedding (shared with the output layer), plus a +-`number_scale`
    marker over the next 8 dimensions for the zero-padded (box) form, so `012` and `12` differ."""
    n = min(spec.number_features, (spec.d_model - 8) // 2 * 2)  # room for the 8 marker dimensions
    if n <= 0:
        return
    vocab = tokenizer.get_vocab()
    tokens = [t for t in number_tokens() if t in vocab]
    values = np.array([int(t) for t in tokens], np.float64)
    feats = number_value_features(values, n) * spec.number_scale * np.sqrt(n / 2)
    # box values are exactly three digits ("000"-"999"); angles and counts are unpadded
    padded = np.array([1.0 if len(t) == 3 and t.isdigit() else -1.0 for t in tokens]) * spec.number_scale
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        ids = torch.tensor([vocab[t] for t in tokens])
        emb[ids, :n] = torch.tensor(feats, dtype=emb.dtype)
        emb[ids, n:n + 8] = torch.tensor(padded, dtype=emb.dtype)[:, None].expand(-1, 8)


def _pad(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def _set_generation_defaults(model) -> None:
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id, gc.eos_token_id = BOS_ID, PAD_ID, EOS_ID
    gc.decoder_start_token_id = EOS_ID
    gc.forced_eos_token_id = None
    gc.forced_bos_token_id = None


def describe(backend: TinyBackend) -> dict[str, Any]:
    """Sizes worth printing in a notebook: parameters per part, image tokens, vocabulary."""
    m = backend.model.model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return {
        "model": type(backend.model).__name__,
        "params_total": count(backend.model),
        "params_vision": count(m.vision_tower) + count(m.multi_modal_projector),
        "params_language": count(m.language_model),
        "image_tokens": backend.num_image_tokens,
        "vocab_size": len(backend.tokenizer),
        "image_size": backend.image_processor.size,
    }
