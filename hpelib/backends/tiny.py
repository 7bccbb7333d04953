"""The embedded `tiny` backend: a real `transformers` VLM at toy size that learns on a CPU in minutes.

Design (chosen by experiment, see `docs/tiny_backend.md`):

- **Model**: `transformers.Qwen3VLForConditionalGeneration`, randomly initialised from a small
  config (~4.5 M parameters). A decoder-only VLM: the image tokens, the prompt and the answer are
  one causal sequence, so the answer attends to the image directly. Qwen3-VL's vision tower adds
  *learned absolute position embeddings* to its patches; Qwen2-VL's (rotary positions only) and
  Florence-2's encoder-decoder both stalled at a constant box in the same budget. With absolute
  positions the answers follow the head within the first few hundred steps.
- **Tokenizer**, built in code with `tokenizers` and wrapped as `PreTrainedTokenizerFast`: Qwen's
  special tokens and chat template, and a word-level vocabulary in which every number of the
  answer grammar is ONE token (`000`-`999`, `0`-`999`, `-0`-`-180`), so box corners and angles
  are classification over bins (as in Pix2Seq). The answer *string* is exactly the grammar of
  `hpelib.prompts`: tokens decode by plain concatenation (`decoders.Fuse`).
- **Processor**: Qwen2-VL's own image processor (the PIL/numpy one: torchvision is not importable
  here) with 16 px patches and 2 x 2 merging, assembled with the tokenizer into the same
  image-only processor the `qwen2_vl` backend uses. At 128 px: 8 x 8 patches, 16 image tokens.

On a CPU the vision tower's patch embedding (a `Conv3d` whose kernel covers each patch) runs as
one matrix product (`PatchProjection`: the same weights and outputs; the convolution's backward took
~90 ms of a ~0.7 s base training step in a profile). For the same reason the language model's
attention is transformers' `eager` one (its 50-token sequences: PyTorch's CPU flash-attention backward
took a fifth of an adapter step), and the tower's attends over all images of a batch at once
(`UniformVisionAttention`: the stock class loops over the images, 32 small calls per block).
`TinySpec.stem = "conv"` adds a small CNN over the whole image to the patch embedding (`ConvStem`;
the default profile's base has it).

Everything else (encoding with the loss on answer tokens only, collation, batched greedy
generation) is the `qwen2_vl` backend's code: the embedded model and the hub models share one path.
Saved with `save_pretrained` (safetensors) and loaded without remote code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention, Qwen3VLVisionPatchEmbed, \
    apply_rotary_pos_emb_vision

from hpelib.backends import hub
from hpelib.backends.qwen2_vl import CHAT_TEMPLATE, END_OF_TURN, SPECIAL_TOKENS, ImageOnlyQwen2VLProcessor, \
    Qwen2VLBackend

PAD_TOKEN = "<|endoftext|>"

# One pre-token per grammar piece: "[[", "]]", " yaw:" (the space belongs to the field name, so
# an answer is ~10-15 tokens), numbers of 1-3 digits with an optional minus, words, single characters.
PRETOKEN_PATTERN = r"\[\[|\]\]| ?(?:yaw|pitch|roll|tilt|depth):|-?[0-9]{1,3}| ?[A-Za-z]+|\s|[^\sA-Za-z0-9]"
_PRETOKEN_RE = re.compile(PRETOKEN_PATTERN)
STEMS = ("linear", "conv")  # TinySpec.stem
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

    The vocabulary is: Qwen's special tokens (`<|im_start|>`, `<|image_pad|>`, ...), the chat
    roles, every grammar number (`number_tokens`), the printable ASCII punctuation, the grammar
    pieces (`[[`, `]]`, ` yaw:` ...) and every word of `corpus` with and without its leading space
    (sorted, so the same corpus always gives the same ids). Unknown words map to `<|endoftext|>`.
    """
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    for t in SPECIAL_TOKENS + ("user", "assistant", "[[", "]]"):
        add(t)
    for t in number_tokens():
        add(t)
    for c in " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n\t":
        add(c)
    for t in tuple(f"{s}{n}:" for n in ("yaw", "pitch", "roll", "tilt", "depth") for s in ("", " ")):
        add(t)
    words = {w.strip() for text in corpus for w in _PRETOKEN_RE.findall(text) if w.strip().isalpha()}
    for w in sorted(words):
        add(w)
        add(" " + w)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces concatenate back to the exact string
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=END_OF_TURN, pad_token=PAD_TOKEN, unk_token=PAD_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]), clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------ the model
@dataclass
class TinySpec:
    """Sizes of the tiny Qwen3-VL (the numbers the experiments in docs/tiny_backend.md chose).

    ~4.5 M parameters: a 4-block ViT of width 128 on 16 px patches (with deepstack features from
    blocks 1 and 2) and a 4-layer decoder of width 192. At 128 px: 16 image tokens.
    """

    hidden_size: int = 192
    layers: int = 4
    heads: int = 3  # head_dim 64
    intermediate_size: int = 576
    vision_dim: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    vision_intermediate_size: int = 512
    patch_size: int = 16
    deepstack: list[int] = field(default_factory=lambda: [1, 2])  # vision blocks whose features feed LM layers 0, 1
    rope_theta: float = 10000.0
    number_code: float = 0.0  # > 0: number tokens start with an ordinal code of this size in their input
    # and output rows (`ordinal_number_init`); 0: plain random rows
    angle_circle: float = 0.0  # > 0: the angle tokens' output rows start with a circular code of this radius
    # (`circular_angle_init`), so a hidden state's direction in one plane picks the angle; 0: plain rows
    stem: str = "linear"  # "linear": Qwen-VL's patch projection alone; "conv": plus `ConvStem` (a small CNN
    # over the whole image whose feature map adds to the patch embedding)
    stem_widths: list[int] = field(default_factory=lambda: [32, 64, 96])  # "conv": channels of the stride-2
    # convolutions before the last one (which has `vision_dim`); one stride-2 layer per halving of the patch

    def __post_init__(self) -> None:
        if self.stem not in STEMS:
            raise ValueError(f"TinySpec.stem must be one of {STEMS}, got {self.stem!r}")
        if self.stem == "conv":
            halvings = self.patch_size.bit_length() - 1
            if 2 ** halvings != self.patch_size or len(self.stem_widths) != halvings - 1:
                raise ValueError(f"TinySpec.stem_widths: a conv stem for {self.patch_size} px patches needs a power-of-"
                                 f"two patch size and {halvings - 1} widths (one stride-2 layer per halving, the last "
                                 f"of width vision_dim), got {self.stem_widths}")

    def grid(self, image_size: int) -> int:
        """Patches per side at `image_size` px; raises unless 2 x 2 merging tiles the image."""
        step = 2 * self.patch_size
        if image_size % step:
            raise ValueError(f"data.image_size must be a multiple of {step} for the tiny backend "
                             f"({self.patch_size} px patches merged 2 x 2), got {image_size}")
        return image_size // self.patch_size

    def num_image_tokens(self, image_size: int) -> int:
        return (self.grid(image_size) // 2) ** 2

    def qwen3_vl_config(self, vocab_size: int, image_size: int, ids: dict[str, int]) -> Qwen3VLConfig:
        head_dim = self.hidden_size // self.heads
        quarter = head_dim // 2 * 5 // 16  # M-RoPE frequencies for height and width; time gets the rest
        text = dict(
            vocab_size=vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            head_dim=head_dim, max_position_embeddings=512, bos_token_id=None, eos_token_id=ids[END_OF_TURN],
            pad_token_id=ids[PAD_TOKEN],
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta, "mrope_interleaved": True,
                             "mrope_section": [head_dim // 2 - 2 * quarter, quarter, quarter]})
        grid = self.grid(image_size)
        vision = dict(
            depth=self.vision_depth, hidden_size=self.vision_dim, intermediate_size=self.vision_intermediate_size,
            num_heads=self.vision_heads, patch_size=self.patch_size, spatial_merge_size=2, temporal_patch_size=2,
            in_channels=3, out_hidden_size=self.hidden_size, num_position_embeddings=grid * grid,
            deepstack_visual_indexes=list(self.deepstack))
        return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                             video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                             vision_end_token_id=ids["<|vision_end|>"])


def spec_from_fields(fields: dict, name: str = "model.tiny_spec") -> TinySpec:
    """`TinySpec` with `fields` replacing its defaults; an unknown field or a value `TinySpec`
    refuses is a `ValueError` naming the parameter (`name`)."""
    try:
        return TinySpec(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} = {fields!r}: {e} (the fields are TinySpec's, hpelib/backends/tiny.py)") from e


def spec_for(config) -> TinySpec:
    """The tiny model `config` asks for: `TinySpec`'s defaults and `config.model.tiny_spec`."""
    return spec_from_fields(dict(config.model.tiny_spec))


BACKEND_FILE = "tiny_backend.json"


def ordinal_number_init(model, tokenizer, scale: float, seed: int = 0) -> None:
    """Give number tokens rows that a linear read-out can turn into a value.

    With random rows, the output layer's 361 angle tokens point in unrelated directions, so a
    hidden state must be mapped non-linearly to the right one. Here each number token's output row
    (and input embedding) gets `scale * (u e1 - u^2/2 e2)` added, in a plane of two fixed random
    orthonormal directions: then `h . row = scale (a u - b u^2 / 2)`, a parabola in u peaking at
    `u = a / b`, so the softmax over the numbers is a discretised Gaussian whose centre is a *linear*
    function of the hidden state. Two planes: angles (signed tokens -180..180, u = v / 180) and box
    values (3-digit tokens 000..999, u = (v - 500) / 500); `100`..`180` are both and get both codes.
    """
    from hpelib.soft_targets import number_tokens_by_kind

    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.text_config.hidden_size
    planes = torch.linalg.qr(torch.randn(hidden, 4, generator=gen))[0].T  # 4 orthonormal directions
    out_rows, in_rows = model.lm_head.weight, model.get_input_embeddings().weight
    angles, boxes = number_tokens_by_kind(tokenizer.get_vocab())
    codes = [(i, v / MAX_ANGLE_TOKEN, planes[0], planes[1]) for v, i in angles]
    codes += [(i, (v - 500) / 500, planes[2], planes[3]) for v, i in boxes]
    with torch.no_grad():
        for i, u, e1, e2 in codes:
            code = scale * (u * e1 - (u * u / 2) * e2)
            out_rows[i] += code.to(out_rows.dtype)
            in_rows[i] += code.to(in_rows.dtype)


def circular_angle_init(model, tokenizer, radius: float, seed: int = 1) -> None:
    """Give the angle tokens output rows whose logits peak where a hidden state points.

    Each angle token `v` (-180..180) gets `radius * (cos(v) e1 + sin(v) e2)` added to its output
    row, in a plane of two fixed random orthonormal directions. A hidden state whose part in that
    plane points at angle `phi` then gives the angles the logits `radius * |h_plane| * cos(v - phi)`
    plus the rows' random part: the most likely angle turns with the hidden state, and the loss's
    gradient pulls it round toward the true angle, as a regression's would. Random rows (and
    `ordinal_number_init`'s parabola, whose peak sharpens only with the hidden state's norm) leave
    a LoRA to learn one direction per angle; with them every measured adapter wrote one constant
    pose. With these rows on the default tower they did no better (docs/tiny_backend.md, R1); on the
    frozen dense tower one of two adapters' yaw followed the head (DC1). Input embeddings are left
    as they are, and so are the words; `100`..`180` are box values too and get the code as well.
    """
    from hpelib.soft_targets import number_tokens_by_kind

    gen = torch.Generator().manual_seed(seed)
    hidden = model.config.text_config.hidden_size
    e1, e2 = torch.linalg.qr(torch.randn(hidden, 2, generator=gen))[0].T
    rows = model.lm_head.weight
    angles, _ = number_tokens_by_kind(tokenizer.get_vocab())
    with torch.no_grad():
        for v, i in angles:
            t = math.radians(v)
            rows[i] += (radius * (math.cos(t) * e1 + math.sin(t) * e2)).to(rows.dtype)


class TinyBackend(Qwen2VLBackend):
    """Qwen3-VL at toy size; the embedded default (`model.backend = "tiny"`).

    `processor` is the image-only Qwen-VL processor; `tokenizer` the word-level tokenizer.
    """

    name = "tiny"

    def __init__(self, model: Qwen3VLForConditionalGeneration, processor: ImageOnlyQwen2VLProcessor,
                 spec: TinySpec, source: str = ""):
        super().__init__(model, processor, source=source)
        PatchProjection.replace(model.model.visual.patch_embed.proj)
        for block in model.model.visual.blocks:
            UniformVisionAttention.replace(block.attn)
        # the same arithmetic, about 10 % of an adapter step less on a CPU (module docstring); the
        # vision config keeps its own (sdpa), which `UniformVisionAttention` calls directly
        model.set_attn_implementation({"text_config": "eager"})
        self.spec = spec
        self.image_processor = processor.image_processor
        self.num_image_tokens = spec.num_image_tokens(self.image_size)
        self._prompt_inputs: dict[str, dict[str, torch.Tensor]] = {}  # prompt -> its token rows (encode)

    @property
    def image_size(self) -> int:
        """The px size the model was built for: one learned position embedding per patch."""
        return _built_image_size(self.model)

    # ---- building and persistence -----------------------------------------------------------
    @classmethod
    def build(cls, config, spec: TinySpec | None = None, seed: int | None = None) -> "TinyBackend":
        """A randomly initialised tiny VLM for `config` (image size from `config.data.image_size`).

        The tokenizer's corpus is every prompt and answer word of `hpelib.data.tasks`.
        """
        from hpelib.data.tasks import corpus

        spec = spec or spec_for(config)
        size = config.data.image_size
        spec.grid(size)  # a clear error before anything is built
        tokenizer = build_tokenizer(corpus())
        processor = ImageOnlyQwen2VLProcessor(image_processor=_image_processor(size, spec.patch_size),
                                              tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        torch.manual_seed(config.seed if seed is None else seed)
        model = Qwen3VLForConditionalGeneration(spec.qwen3_vl_config(len(tokenizer), size, ids))
        if spec.stem == "conv":
            ConvStem.install(model, spec)
        if spec.number_code > 0:
            ordinal_number_init(model, tokenizer, spec.number_code)
        if spec.angle_circle > 0:
            circular_angle_init(model, tokenizer, spec.angle_circle)
        device = hub.resolve_device(config.model.device)
        model.to(dtype=getattr(torch, config.model.dtype), device=device)
        return cls(model, processor, spec)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> "TinyBackend":
        """What `save` wrote, on `device` (`"auto"`: cuda when available)."""
        path = Path(path)
        if not (path / BACKEND_FILE).exists():
            raise FileNotFoundError(f"{path}: no {BACKEND_FILE}; not a saved tiny backend")
        spec = spec_from_fields(json.loads((path / BACKEND_FILE).read_text())["spec"], str(path / BACKEND_FILE))
        if spec.stem == "conv":  # not a layer transformers knows: the model is built, then its weights loaded
            model = _load_with_stem(path, spec, hub.resolve_device(device))
        else:
            model = Qwen3VLForConditionalGeneration.from_pretrained(
                path, use_safetensors=True, device_map={"": str(hub.resolve_device(device))})
        processor = ImageOnlyQwen2VLProcessor.from_pretrained(path, local_files_only=True)
        # the numpy image processor `build` made: where torchvision imports, `from_pretrained` resolves
        # transformers' torchvision one, whose `rescale`/`normalize` take tensors, not `encode`'s arrays
        processor.image_processor = _image_processor(_built_image_size(model), spec.patch_size)
        return cls(model.eval(), processor, spec, source=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Weights as `model.safetensors`, the processor (tokenizer, image processor, chat template)
        and the tiny spec, all in `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        (path / BACKEND_FILE).write_text(json.dumps({"spec": dataclasses.asdict(self.spec)}, indent=2))
        return path

    # ---- data -------------------------------------------------------------------------------
    def encode(self, sample) -> dict[str, torch.Tensor]:
        """The `qwen2_vl` backend's encoding in a third of the time: every image has the model's size,
        so a prompt's token rows (image tokens included) are the same for any image and are cached per
        prompt, and the image is cut into patches with the image processor's own `rescale`,
        `normalize` and `patchify` (the processor's tensors exactly, tested). The processor took an
        eighth of each base training step on 2 cores before."""
        image = np.asarray(sample.image, dtype=np.uint8)[..., :3]
        ip = self.image_processor
        if image.shape[:2] != (self.image_size, self.image_size):  # the processor resizes it
            return super().encode(sample)
        cached = self._prompt_inputs.get(sample.prompt)
        if cached is None:
            inputs = super().encode(dataclasses.replace(sample, answer=None))
            cached = self._prompt_inputs[sample.prompt] = {k: v for k, v in inputs.items() if k != "pixel_values"}
        pixels = ip.normalize(ip.rescale(image.transpose(2, 0, 1), ip.rescale_factor), ip.image_mean, ip.image_std)
        patches, _, _ = ip.patchify(pixels, patch_size=ip.patch_size, merge_size=ip.merge_size,
                                    temporal_patch_size=ip.temporal_patch_size)
        out = {**cached, "pixel_values": torch.from_numpy(np.ascontiguousarray(patches))}
        if sample.answer is not None:
            out = self.append_answer(out, sample.answer)
        return out

    # ---- LoRA -------------------------------------------------------------------------------
    def lora_target_modules(self, language: bool = True, vision: bool = True, projector: bool = False) -> str:
        """The `qwen2_vl` backend's expressions (vision on by default here, as the `lora` section's
        `target_vision`): the decoder layers' attention and MLP projections, the vision blocks'
        `attn.qkv`/`attn.proj`/`mlp.linear_fc1|2`, and when asked the merger and deepstack mergers'
        `linear_fc1|2` (`projector`). Never `lm_head`, the embeddings or the patch embedding."""
        return super().lora_target_modules(language, vision, projector)


def _load_with_stem(path: Path, spec: TinySpec, device: torch.device) -> Qwen3VLForConditionalGeneration:
    """A saved model with a `ConvStem`: built from its config, stem installed, every weight loaded
    (strictly: a missing or extra weight is an error naming the file)."""
    from safetensors.torch import load_file

    weights = path / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{weights}: the tiny backend's weights are missing")
    state = load_file(str(weights))
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig.from_pretrained(path, local_files_only=True))
    ConvStem.install(model, spec)
    model.to(dtype=next(iter(state.values())).dtype)  # the dtype it was saved in
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: does not fit a tiny model with spec {spec} "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device)


class PatchProjection(torch.nn.Conv3d):
    """A `Conv3d` whose kernel and stride equal its input's size, computed as the linear map it is.

    Qwen-VL's patch embedding is such a convolution over each (channels, time, h, w) patch. Its
    weights, `state_dict` and outputs are the convolution's (tested); only the arithmetic differs:
    on a CPU oneDNN's convolution backward took ~90 ms of a ~0.7 s tiny base step, the matrix
    product ~1 ms.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        out = torch.nn.functional.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1),
                                         self.bias)
        return out.view(x.shape[0], self.out_channels, 1, 1, 1)

    @classmethod
    def replace(cls, conv: torch.nn.Conv3d) -> "PatchProjection":
        """`conv`'s class swapped in place (its parameters stay the same objects)."""
        if type(conv) is not torch.nn.Conv3d or conv.kernel_size != conv.stride or conv.groups != 1 \
                or any(conv.padding) or any(d != 1 for d in conv.dilation):
            raise ValueError(f"PatchProjection replaces a plain Conv3d with stride == kernel, got {conv}")
        conv.__class__ = cls
        return conv


class UniformVisionAttention(Qwen3VLVisionAttention):
    """Qwen3-VL's vision attention computed for all images at once when they have the same number of
    patches, as every image of the tiny backend does (one size per model).

    The stock class splits its packed sequence at `cu_seqlens` and calls the attention once per image
    unless flash-attention is installed: 32 calls per block and batch. Here the packed sequence is a
    batch of equal-length sequences, one `scaled_dot_product_attention` call: the same outputs
    (tested), ~8 % of a tiny adapter step less on a CPU. Images of different sizes take the stock path.
    """

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if position_embeddings is None or (self.training and self.attention_dropout > 0) \
                or not bool((lengths == lengths[0]).all()):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        total, images, length = hidden_states.shape[0], len(lengths), int(lengths[0])
        q, k, v = self.qkv(hidden_states).reshape(total, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        q, k, v = (t.reshape(images, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(total, -1))

    @classmethod
    def replace(cls, attn: Qwen3VLVisionAttention) -> "UniformVisionAttention":
        """`attn`'s class swapped in place (its parameters stay the same objects)."""
        if not isinstance(attn, Qwen3VLVisionAttention):
            raise ValueError(f"UniformVisionAttention replaces a Qwen3VLVisionAttention, got {type(attn).__name__}")
        attn.__class__ = cls
        return attn


class ConvStem(torch.nn.Module):
    """A small CNN over the whole image whose feature map is added to Qwen-VL's patch embedding.

    The patch projection sees each 16 px patch alone and linearly; this sees the image through
    3 x 3 convolutions, each of stride 2 (conv, GroupNorm, GELU; one per halving of the patch size),
    so each patch token also carries features with a receptive field across its neighbours, as the
    hybrid ViTs' CNN stems do. Input and output are the patch embedding's: `(patches, C * T * p * p)`
    rows in the image processor's order (2 x 2 merge windows first) -> `(patches, vision_dim)`. Every
    image has the model's size, so the rows of one image are `grid * grid` consecutive ones.
    """

    def __init__(self, grid: int, patch_size: int, merge: int, widths: list[int], out_dim: int,
                 channels: int = 3, temporal: int = 2):
        super().__init__()
        self.grid, self.patch_size, self.merge = grid, patch_size, merge
        self.channels, self.temporal = channels, temporal
        layers, cin = [], channels
        for i, width in enumerate([*widths, out_dim]):
            last = i == len(widths)
            layers += [torch.nn.Conv2d(cin, width, 3, 2, 1)]
            if not last:
                layers += [torch.nn.GroupNorm(min(8, width), width), torch.nn.GELU()]
            cin = width
        self.layers = torch.nn.Sequential(*layers)
        torch.nn.init.zeros_(self.layers[-1].weight)  # starts as the plain patch embedding
        torch.nn.init.zeros_(self.layers[-1].bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.images(patches)
        return self.tokens(self.layers(x.to(self.layers[0].weight.dtype)))

    def images(self, patches: torch.Tensor) -> torch.Tensor:
        """`(patches, C * T * p * p)` rows -> `(images, C, H, W)` (an image's frames are equal: averaged)."""
        g, m, p, c, t = self.grid, self.merge, self.patch_size, self.channels, self.temporal
        if patches.dim() != 2 or patches.shape[0] % (g * g) or patches.shape[1] != c * t * p * p:
            raise ValueError(f"ConvStem: patches {tuple(patches.shape)} are not whole images of {g} x {g} "
                             f"patches of {c * t * p * p} values")
        x = patches.view(-1, g // m, g // m, m, m, c, t, p, p).mean(dim=6)
        return x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(-1, c, g * p, g * p)

    def tokens(self, maps: torch.Tensor) -> torch.Tensor:
        """`(images, D, grid, grid)` feature maps -> `(patches, D)` rows in the patches' order."""
        g, m = self.grid, self.merge
        y = maps.view(maps.shape[0], -1, g // m, m, g // m, m).permute(0, 2, 4, 3, 5, 1)
        return y.reshape(-1, y.shape[-1])

    @classmethod
    def install(cls, model: Qwen3VLForConditionalGeneration, spec: TinySpec) -> ConvStem:
        """Add a stem to `model`'s vision tower: `patch_embed` then returns projection + stem."""
        vision = model.config.vision_config
        grid = int(round(vision.num_position_embeddings ** 0.5))
        stem = cls(grid, vision.patch_size, vision.spatial_merge_size, list(spec.stem_widths), vision.hidden_size,
                   vision.in_channels, vision.temporal_patch_size)
        embed = model.model.visual.patch_embed
        embed.stem = stem.to(device=embed.proj.weight.device, dtype=embed.proj.weight.dtype)
        embed.__class__ = _StemPatchEmbed
        return stem


class _StemPatchEmbed(Qwen3VLVisionPatchEmbed):
    """Qwen3-VL's patch embedding plus its `stem` (`ConvStem.install`)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states) + self.stem(hidden_states)


def _built_image_size(model: Qwen3VLForConditionalGeneration) -> int:
    """The px size `model` was built for: one learned position embedding per patch."""
    vision = model.config.vision_config
    return int(round(vision.num_position_embeddings ** 0.5)) * vision.patch_size


def _image_processor(size: int, patch_size: int):
    """Qwen2-VL's numpy image processor, fixed to `size` x `size` px (normalised around 0.5)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size, patch_size=patch_size,
                                    merge_size=2, image_mean=[0.5] * 3, image_std=[0.25] * 3)


def describe(backend: TinyBackend) -> dict[str, Any]:
    """Sizes worth printing in a notebook: parameters per part, image tokens, vocabulary."""
    m = backend.model.model
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return {
        "model": type(backend.model).__name__,
        "params_total": count(backend.model),
        "params_vision": count(m.visual),
        "params_language": count(m.language_model) + count(backend.model.lm_head),
        "image_tokens": backend.num_image_tokens,
        "vocab_size": len(backend.tokenizer),
        "image_size": backend.image_size,
    }
