"""The hub backends (`qwen2_vl`, `cogvlm`) on tiny stand-ins: no real weights exist here.

Qwen2-VL: a randomly initialised checkpoint of the real classes (`write_tiny_checkpoint`), loaded
by folder path exactly as a downloaded hub folder would be. CogVLM: its remote code cannot run here,
so a stub module tree carries CogVLM's real module names (for LoRA targeting) and a stub
`build_conversation_input_ids` records what the backend passes to it.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hpelib.backends import hub
from hpelib.backends.base import Sample, get_backend_class
from hpelib.backends.cogvlm import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, CogVLMBackend
from hpelib.backends.qwen2_vl import Qwen2VLBackend, write_tiny_checkpoint
from hpelib.config import make_config
from hpelib.prompts import HPE_PROMPT, grounding_prompt

ANSWER = "[[086,540,400,760]] yaw:-12 pitch:5 roll:0"
CORPUS = [HPE_PROMPT, grounding_prompt("head"), "yaw pitch roll"]


def _image(seed: int, h: int = 64, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _lora_targets(model: nn.Module, regex: str) -> list[str]:
    """Module names PEFT adapts with `target_modules=regex` (PEFT's own matching, then read back)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=regex))
    names = [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    peft_model.unload()  # restore the plain modules for the next test
    return sorted(names)


# ------------------------------------------------------------------------------------ qwen2_vl
@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2-vl"), corpus=CORPUS)


@pytest.fixture(scope="module")
def qwen(qwen_folder):
    cfg = make_config("quick", {"model.backend": "qwen2_vl", "model.model_id": str(qwen_folder)})
    return get_backend_class("qwen2_vl").build(cfg)


def test_qwen_builds_from_a_folder_with_the_checkpoints_own_class_and_processor(qwen, qwen_folder):
    from transformers import Qwen2VLForConditionalGeneration

    assert isinstance(qwen.model, Qwen2VLForConditionalGeneration)
    assert qwen.source == str(qwen_folder)
    assert qwen.device.type == ("cuda" if torch.cuda.is_available() else "cpu")  # device "auto"
    assert hasattr(qwen.processor, "image_processor") and qwen.processor.chat_template
    # a hub folder names the real processor class, whichever class assembled it here
    assert json.loads((qwen_folder / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"


def test_qwen_answer_loss_matches_the_models_own(qwen):
    """`Qwen2VLBackend.answer_logits_only`: its forward takes the boolean `logits_to_keep` mask, and
    `train.answer_loss` equals the model's own loss on a padded batch of two answers."""
    from hpelib import train

    assert qwen.answer_logits_only and not CogVLMBackend.answer_logits_only
    batch = qwen.collate([qwen.encode(Sample(_image(0), HPE_PROMPT, ANSWER)),
                          qwen.encode(Sample(_image(1), HPE_PROMPT, "[[000,000,999,999]] yaw:1 pitch:2 roll:3"))])
    batch = {k: v.to(qwen.device) for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(train.answer_loss(qwen.model, batch), qwen.model(**batch).loss)


def test_qwen_encode_puts_the_loss_on_the_answer_only(qwen):
    enc = qwen.encode(Sample(_image(0), HPE_PROMPT, ANSWER))
    ids, labels, types = enc["input_ids"], enc["labels"], enc["mm_token_type_ids"]
    assert ids.shape == labels.shape == types.shape == enc["attention_mask"].shape
    on = labels != -100
    assert qwen.tokenizer.decode(labels[on]) == ANSWER + "<|im_end|>"
    assert on.nonzero().min() == ids.numel() - on.sum()  # one block at the end
    assert torch.equal(labels[on], ids[on])
    text = qwen.tokenizer.decode(ids[~on])
    assert text.startswith("<|im_start|>user\n<|vision_start|>") and text.endswith(HPE_PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    # transformers 5 reads the M-RoPE layout from mm_token_type_ids: 1 exactly on the image pads
    image_id = qwen.processor.image_token_id
    assert torch.equal(types == 1, ids == image_id)
    assert int((ids == image_id).sum()) == int(enc["image_grid_thw"].prod()) // 4  # 2 x 2 merge
    assert enc["pixel_values"].shape == (int(enc["image_grid_thw"].prod()), 3 * 2 * 14 * 14)


def test_qwen_collate_and_one_lora_training_step(qwen):
    from peft import LoraConfig, get_peft_model

    samples = [Sample(_image(1), HPE_PROMPT, ANSWER), Sample(_image(2, 56, 112), grounding_prompt("head"), "[[1,2,3,4]]")]
    batch = qwen.collate([qwen.encode(s) for s in samples])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["mm_token_type_ids"].shape
    assert batch["image_grid_thw"].shape == (2, 3)
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(-1).sum())
    peft_model = get_peft_model(qwen.model, LoraConfig(r=4, lora_alpha=8, target_modules=qwen.lora_target_modules()))
    try:
        peft_model.train()
        loss = peft_model(**batch).loss
        assert torch.isfinite(loss)
        loss.backward()
        grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
        assert grads and all("lora_" in n for n in grads)
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    finally:
        peft_model.unload()
        qwen.model.zero_grad(set_to_none=True)
        qwen.model.eval()


def test_qwen_generate_returns_strings_and_left_padding_changes_nothing(qwen):
    a, b = Sample(_image(3), HPE_PROMPT), Sample(_image(4, 84, 56), grounding_prompt("head"))
    both = qwen.generate([a, b], max_new_tokens=6)
    assert len(both) == 2 and all(isinstance(t, str) for t in both)
    assert both == qwen.generate([a], max_new_tokens=6) + qwen.generate([b], max_new_tokens=6)
    assert qwen.generate([]) == []


QWEN_LANGUAGE = [f"model.language_model.layers.{i}.{m}" for i in range(2) for m in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
QWEN_VISION = [f"model.visual.blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def test_qwen_lora_targets_exactly_the_language_projections_unless_vision_is_asked(qwen):
    assert _lora_targets(qwen.model, qwen.lora_target_modules()) == sorted(QWEN_LANGUAGE)
    assert _lora_targets(qwen.model, qwen.lora_target_modules(vision=True)) == sorted(QWEN_LANGUAGE + QWEN_VISION)
    assert _lora_targets(qwen.model, qwen.lora_target_modules(language=False, vision=True)) == sorted(QWEN_VISION)
    merger = ["model.visual.merger.mlp.0", "model.visual.merger.mlp.2"]
    assert _lora_targets(qwen.model, qwen.lora_target_modules(projector=True)) == sorted(QWEN_LANGUAGE + merger)
    with pytest.raises(ValueError, match="language=True, vision=True or projector=True"):
        qwen.lora_target_modules(language=False, vision=False)


def test_qwen2_5_vision_mlp_shares_names_with_the_language_mlp_but_is_not_hit(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "q25", corpus=CORPUS, model_type="qwen2_5_vl", layers=1)
    backend = Qwen2VLBackend.load(folder)
    assert type(backend.model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    language = [f"model.language_model.layers.0.{m}" for m in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    vision = [f"model.visual.blocks.0.{m}" for m in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert _lora_targets(backend.model, backend.lora_target_modules()) == sorted(language)
    assert _lora_targets(backend.model, backend.lora_target_modules(vision=True)) == sorted(language + vision)
    assert all(isinstance(t, str) for t in backend.generate([Sample(_image(5), HPE_PROMPT)], max_new_tokens=3))


def test_qwen_save_load_round_trip_gives_the_same_logits(qwen, tmp_path):
    batch = qwen.collate([qwen.encode(Sample(_image(6), HPE_PROMPT, ANSWER))])
    saved = qwen.save(tmp_path / "saved")
    assert (saved / "model.safetensors").exists() and not list(saved.glob("*.bin"))
    again = Qwen2VLBackend.load(saved, device=str(qwen.device), dtype="float32",
                                gradient_checkpointing=True)
    with torch.no_grad():
        torch.testing.assert_close(again.model(**batch).logits, qwen.model(**batch).logits, rtol=0, atol=0)
    again.model.train()  # checkpointed blocks still back-propagate
    again.model(**batch).loss.backward()
    assert again.model.lm_head.weight.grad is not None


def test_qwen_reads_the_2024_hub_layout_too(qwen_folder, tmp_path):
    """Hub checkpoints of 2024 keep the image processor in preprocessor_config.json and the
    template in chat_template.json (transformers 5 writes processor_config.json / .jinja)."""
    import shutil

    folder = shutil.copytree(qwen_folder, tmp_path / "hub-2024")
    image_processor = json.loads((folder / "processor_config.json").read_text())["image_processor"]
    (folder / "preprocessor_config.json").write_text(json.dumps({**image_processor, "processor_class": "Qwen2VLProcessor"}))
    (folder / "processor_config.json").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": (folder / "chat_template.jinja").read_text()}))
    (folder / "chat_template.jinja").unlink()
    backend = Qwen2VLBackend.load(folder)
    enc = backend.encode(Sample(_image(10), HPE_PROMPT, ANSWER))
    assert backend.tokenizer.decode(enc["labels"][enc["labels"] != -100]) == ANSWER + "<|im_end|>"


def test_qwen_load_errors_name_the_model_and_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(FileNotFoundError, match="/no/such/folder"):
        Qwen2VLBackend.load("/no/such/folder")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama' model.*qwen2_vl backend reads"):
        Qwen2VLBackend.load(tmp_path / "llama")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"hub id 'no-org/no-model'(.|\n)*-p model.model_id DIR"):
        Qwen2VLBackend.load("no-org/no-model")
    with pytest.raises(ValueError, match="model.load_in_4bit"):
        hub.from_pretrained_kwargs(hub.Source("x", True), dtype=torch.bfloat16, device=torch.device("cpu"),
                                   load_in_4bit=True)


# ------------------------------------------------------------------------------------ cogvlm
class _Cfg:
    """The config fields the remote code reads (`config.vision_config['image_size']`)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _mlp(d: int) -> nn.Module:
    m = nn.Module()
    m.gate_proj, m.up_proj, m.down_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
    return m


class StubCogVLM(nn.Module):
    """CogVLMForCausalLM's module tree (modeling_cogvlm.py + visual.py of the -hf checkpoints) at toy
    size, with a `build_conversation_input_ids` that behaves like the real one and records its calls."""

    def __init__(self, layers: int = 2, d: int = 8, image_size: int = 28, patch_size: int = 14):
        super().__init__()
        self.config = _Cfg(vision_config={"image_size": image_size, "patch_size": patch_size}, template_version="chat")
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(64, d)
        self.model.layers = nn.ModuleList()
        for _ in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            for e in ("vision", "language"):
                setattr(layer.self_attn, f"{e}_expert_query_key_value", nn.Linear(d, 3 * d, bias=False))
                setattr(layer.self_attn, f"{e}_expert_dense", nn.Linear(d, d, bias=False))
            layer.mlp = nn.Module()
            layer.mlp.language_mlp, layer.mlp.vision_mlp = _mlp(d), _mlp(d)
            layer.input_layernorm, layer.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
            self.model.layers.append(layer)
        self.model.norm = nn.LayerNorm(d)
        vision = self.model.vision = nn.Module()  # EVA2CLIPModel
        vision.patch_embedding = nn.Module()
        vision.patch_embedding.proj = nn.Conv2d(3, d, patch_size, patch_size)
        vision.patch_embedding.position_embedding = nn.Embedding(5, d)
        vision.transformer = nn.Module()
        vision.transformer.layers = nn.ModuleList()
        for _ in range(layers):
            t = nn.Module()
            t.input_layernorm, t.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)
            t.attention = nn.Module()
            t.attention.query_key_value, t.attention.dense = nn.Linear(d, 3 * d), nn.Linear(d, d)
            t.mlp = nn.Module()
            t.mlp.fc1, t.mlp.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
            vision.transformer.layers.append(t)
        vision.linear_proj = nn.Module()  # GLU
        g = vision.linear_proj
        g.linear_proj, g.norm1 = nn.Linear(d, d, bias=False), nn.LayerNorm(d)
        g.dense_h_to_4h, g.gate_proj, g.dense_4h_to_h = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False), nn.Linear(2 * d, d, bias=False)
        self.lm_head = nn.Linear(d, 64, bias=False)
        self.calls: list[dict] = []

    def build_conversation_input_ids(self, tokenizer, *, query, history=None, images=None, template_version=None):
        self.calls.append(dict(tokenizer=tokenizer, query=query, history=history, images=images,
                               template_version=template_version))
        size, patch = self.config.vision_config["image_size"], self.config.vision_config["patch_size"]
        template_version = template_version or self.config.template_version
        text = query if template_version == "base" else f"Question: {query} Answer:"
        ids, types, pixels = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE], None
        if images:
            x = torch.from_numpy(np.asarray(images[0].resize((size, size)), dtype=np.float32) / 255).permute(2, 0, 1)
            pixels = [x]
            n = (size // patch) ** 2 + 2  # patches + boi + eoi
            ids += [tokenizer.pad_token_id] * n
            types += [VISION_TOKEN_TYPE] * n
        text_ids = tokenizer.encode(text, add_special_tokens=False)
        ids += text_ids
        types += [LANGUAGE_TOKEN_TYPE] * len(text_ids)
        return {"input_ids": torch.tensor(ids), "token_type_ids": torch.tensor(types),
                "attention_mask": torch.ones(len(ids), dtype=torch.long), "images": pixels}


class StubTokenizer:
    """Vicuna's special ids (unk 0, bos 1, eos 2; pad = unk) and one id per character."""

    unk_token_id, bos_token_id, eos_token_id, pad_token_id = 0, 1, 2, None

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + [3 + ord(c) % 60 for c in text]

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(i - 3) for i in r if i > 2) for r in rows]


COG_LANGUAGE = [f"model.layers.{i}.{m}" for i in range(2) for m in
                ("self_attn.language_expert_query_key_value", "self_attn.language_expert_dense",
                 "mlp.language_mlp.gate_proj", "mlp.language_mlp.up_proj", "mlp.language_mlp.down_proj")]
COG_VISION_EXPERTS = [n.replace("language", "vision") for n in COG_LANGUAGE]


def test_cogvlm_lora_targets_the_experts_and_never_the_eva_tower():
    model = StubCogVLM()
    backend = CogVLMBackend(model, StubTokenizer())
    assert _lora_targets(model, backend.lora_target_modules()) == sorted(COG_LANGUAGE)
    both = _lora_targets(model, backend.lora_target_modules(vision=True))
    assert both == sorted(COG_LANGUAGE + COG_VISION_EXPERTS)
    assert _lora_targets(model, backend.lora_target_modules(language=False, vision=True)) == sorted(COG_VISION_EXPERTS)
    assert not any(n.startswith("model.vision.") for n in both)
    glu = [f"model.vision.linear_proj.{m}" for m in ("linear_proj", "dense_h_to_4h", "gate_proj", "dense_4h_to_h")]
    assert _lora_targets(model, backend.lora_target_modules(projector=True)) == sorted(COG_LANGUAGE + glu)
    # why full paths: bare suffixes would also adapt the EVA tower and its GLU adapter
    assert "model.vision.transformer.layers.0.attention.dense" in _lora_targets(model, r".*\.dense")
    assert "model.vision.linear_proj.gate_proj" in _lora_targets(model, r".*\.gate_proj")


def test_cogvlm_prompt_comes_from_the_models_own_builder_with_the_base_template():
    model, tok = StubCogVLM(), StubTokenizer()
    backend = CogVLMBackend(model, tok)
    assert tok.pad_token_id == tok.unk_token_id  # Vicuna has no pad token: <unk> pads
    image = _image(7, 40, 60)
    enc = backend.encode(Sample(image, HPE_PROMPT, ANSWER))
    (call,) = model.calls
    assert call["tokenizer"] is tok and call["query"] == HPE_PROMPT and call["template_version"] == "base"
    assert len(call["images"]) == 1 and isinstance(call["images"][0], Image.Image)
    np.testing.assert_array_equal(np.asarray(call["images"][0]), image)
    n_vision = (28 // 14) ** 2 + 2
    assert enc["token_type_ids"].tolist() == [0] + [1] * n_vision + [0] * (len(enc["input_ids"]) - 1 - n_vision)
    answer = tok.encode(ANSWER, add_special_tokens=False) + [tok.eos_token_id]
    labels = enc["labels"]
    assert labels[labels != -100].tolist() == answer == enc["input_ids"][-len(answer):].tolist()
    assert (labels[: -len(answer)] == -100).all()
    assert enc["input_ids"][1 + n_vision: -len(answer)].tolist() == tok.encode(HPE_PROMPT, add_special_tokens=False)
    assert enc["images"].shape == (1, 3, 28, 28)


def test_cogvlm_collate_pads_rows_and_nests_one_image_per_sample():
    backend = CogVLMBackend(StubCogVLM(), StubTokenizer())
    encoded = [backend.encode(Sample(_image(8), HPE_PROMPT, ANSWER)), backend.encode(Sample(_image(9), "head?", "[[1]]"))]
    right = backend.collate(encoded)
    left = backend.collate(encoded, padding_side="left")
    n0, n1 = (e["input_ids"].numel() for e in encoded)
    assert right["input_ids"].shape == (2, max(n0, n1)) and right["images"].shape == (2, 1, 3, 28, 28)
    assert right["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert left["attention_mask"][1].tolist() == [0] * (n0 - n1) + [1] * n1
    assert (right["labels"][1, n1:] == -100).all() and (right["token_type_ids"][1, n1:] == LANGUAGE_TOKEN_TYPE).all()
    # the remote code's encode_images: for image_list in images: for image in image_list -> stack
    assert torch.stack([im for row in right["images"] for im in row]).shape == (2, 3, 28, 28)


def test_cogvlm_needs_trust_remote_code_to_be_set_and_says_so():
    cfg = make_config("quick", {"model.backend": "cogvlm", "model.model_id": "THUDM/cogvlm-grounding-generalist-hf"})
    assert cfg.model.trust_remote_code is False
    with pytest.raises(ValueError, match=r"-p model\.trust_remote_code true"):
        get_backend_class("cogvlm").build(cfg)
    with pytest.raises(ValueError, match="trust_remote_code"):
        CogVLMBackend.load("/any/folder")
    with pytest.raises(ValueError, match="model.trust_remote_code"):
        make_config("default", {"model.trust_remote_code": "yes"})


def test_real_and_gpu_profiles_describe_one_gpu_and_pick_the_device_themselves():
    for name in ("gpu", "real"):
        cfg = make_config(name)
        assert cfg.model.backend == "qwen2_vl" and cfg.model.dtype == "bfloat16" and cfg.model.device == "auto"
        assert cfg.model.gradient_checkpointing and not cfg.lora.target_vision
        assert cfg.lora.train.batch_size * cfg.lora.train.grad_accum == 32
    real = make_config("real")
    assert (real.data.root_300wlp, real.data.root_aflw2000, real.data.biwi_npz) == ("", "", "")


def test_lora_regexes_are_anchored_on_full_names():
    cog = CogVLMBackend(StubCogVLM(), StubTokenizer()).lora_target_modules(vision=True)
    assert re.fullmatch(cog, "base_model.model.model.layers.11.mlp.vision_mlp.up_proj")
    assert not re.fullmatch(cog, "model.vision.transformer.layers.11.mlp.fc1")
    assert not re.fullmatch(cog, "model.layers.1.self_attn.rotary_emb")


@pytest.mark.gpu
def test_tiny_qwen_runs_on_a_gpu_with_the_gpu_profile_unchanged(qwen_folder):
    from peft import get_peft_model

    from hpelib.train import lora_config

    cfg = make_config("gpu", {"model.model_id": str(qwen_folder)})
    backend = get_backend_class(cfg.model.backend).build(cfg)
    assert backend.device.type == "cuda" and backend.dtype == torch.bfloat16
    batch = backend.collate([backend.encode(Sample(_image(i), HPE_PROMPT, ANSWER)) for i in range(4)])
    model = get_peft_model(backend.model, lora_config(cfg, backend))
    model.train()
    loss = model(**{k: v.to(backend.device) for k, v in batch.items()}).loss
    assert torch.isfinite(loss)
    loss.backward()
    backend.model = model
    assert all(isinstance(t, str) for t in backend.generate([Sample(_image(9), HPE_PROMPT)], max_new_tokens=4))
