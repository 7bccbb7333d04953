"""The embedded tiny VLM: tokenizer, build, a few training steps, save/load, generate, LoRA targets.

Models here are micro-sized (`MICRO`: a 2-block ViT of width 16, a 1-layer decoder of width 32) and
images random, so the file runs in seconds without a renderer.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from hpelib import prompts
from hpelib.backends import Sample, get_backend_class
from hpelib.backends.tiny import BACKEND_FILE, ConvStem, PatchProjection, TinyBackend, TinySpec, UniformVisionAttention, \
    build_tokenizer, describe
from hpelib.config import make_config
from hpelib.data import tasks

MICRO = TinySpec(hidden_size=32, layers=1, heads=2, intermediate_size=64, vision_dim=16, vision_depth=2,
                 vision_heads=2, vision_intermediate_size=32, deepstack=[1])


@pytest.fixture(scope="module")
def config():
    return make_config("smoke")  # 64 px images


@pytest.fixture
def backend(config):
    return TinyBackend.build(config, spec=MICRO, seed=0)


def random_samples(n: int, size: int = 64, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        x0, y0 = rng.uniform(0, 0.5, 2)
        box = (x0, y0, x0 + 0.4, y0 + 0.4)
        if i % 2:
            out.append(Sample(img, prompts.HPE_PROMPT, prompts.format_hpe(box, *rng.uniform(-90, 90, 3)), "hpe"))
        else:
            out.append(Sample(img, prompts.grounding_prompt("red cube"), prompts.format_box(box), "box"))
    return out


# ------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_round_trips_answers_with_numbers_as_single_tokens():
    tok = build_tokenizer(tasks.corpus())
    answers = ["[[086,540,400,760]] yaw:-12 pitch:5 roll:0", "[[000,000,999,999]] yaw:-180 pitch:180 roll:-0.5",
               "[[012,345,678,901]]", "tilt:-35 depth:20", "3", "red"]
    for a in answers:
        ids = tok(a, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == a
        assert tok.unk_token_id not in ids
    pieces = tok.convert_ids_to_tokens(tok(answers[0], add_special_tokens=False)["input_ids"])
    assert pieces == ["[[", "086", ",", "540", ",", "400", ",", "760", "]]", " yaw:", "-12", " pitch:", "5",
                      " roll:", "0"]


def test_tokenizer_covers_every_prompt():
    tok = build_tokenizer(tasks.corpus())
    # the object-pose prompts are left out of the corpus (their words are all in it): check them too
    poses = [prompts.pose_prompt(f"{c} {s}") for c in tasks.COLOUR_WORDS for s in tasks.SHAPE_WORDS]
    # likewise the object list's prompt, and its answers: names and boxes
    lists = [tasks.LIST_PROMPT, "red cube [[100,300,200,400]] blue torus [[500,100,600,200]]"]
    for text in tasks.corpus() + poses + lists:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text, text


def test_image_size_must_tile_into_merged_patches():
    with pytest.raises(ValueError, match="data.image_size must be a multiple of 32"):
        TinyBackend.build(make_config("smoke", {"data.image_size": 48}), spec=MICRO)


# ------------------------------------------------------------------------------------ model
def test_registry_builds_a_real_transformers_model(backend):
    assert get_backend_class("tiny") is TinyBackend
    assert type(backend.model).__name__ == "Qwen3VLForConditionalGeneration"
    info = describe(backend)
    assert info["image_tokens"] == (64 // 16 // 2) ** 2  # 16 px patches merged 2 x 2
    # learned absolute position embeddings, one per patch of the image grid
    assert backend.model.model.visual.pos_embed.weight.shape[0] == (64 // 16) ** 2


def test_encode_puts_the_loss_on_answer_tokens_only(backend):
    s = random_samples(2)[1]
    enc = backend.encode(s)
    image_id = backend.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int(enc["input_ids"].eq(image_id).sum()) == backend.num_image_tokens
    assert int(enc["mm_token_type_ids"].sum()) == backend.num_image_tokens
    answer_ids = backend.tokenizer(s.answer, add_special_tokens=False)["input_ids"]
    labelled = enc["labels"][enc["labels"] != -100].tolist()
    assert labelled == answer_ids + [backend.end_id]
    assert enc["labels"][-len(labelled):].tolist() == labelled  # the answer is the end of the sequence
    samples = random_samples(3)
    batch = backend.collate([backend.encode(x) for x in samples])
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 3
    assert batch["attention_mask"].sum(1).tolist() == [len(backend.encode(x)["input_ids"]) for x in samples]
    assert (batch["labels"] == -100).any()  # padded labels are ignored


def test_fast_encode_gives_the_processors_tensors(backend):
    """The tiny backend's cached-prompt, direct-patch encoding equals the processor path, with and
    without an answer, on a first and a repeated prompt; an image of another size is resized by the
    processor as before."""
    from hpelib.backends.qwen2_vl import Qwen2VLBackend

    samples = random_samples(4) + [Sample(random_samples(1, seed=1)[0].image, prompts.HPE_PROMPT, None, "hpe")]
    odd = Sample(random_samples(1, size=96)[0].image, prompts.HPE_PROMPT, "yaw:1 pitch:2 roll:3", "hpe")
    for s in samples + [odd]:
        fast, slow = backend.encode(s), Qwen2VLBackend.encode(backend, s)
        assert fast.keys() == slow.keys()
        for key in slow:
            assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), key
    assert set(backend._prompt_inputs) == {prompts.HPE_PROMPT, prompts.grounding_prompt("red cube")}


def test_a_few_steps_lower_the_loss(backend):
    batch = backend.collate([backend.encode(s) for s in random_samples(4)])
    opt = torch.optim.AdamW(backend.model.parameters(), lr=5e-3)
    backend.model.train()
    losses = []
    for _ in range(15):
        loss = backend.model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_save_and_load_give_the_same_logits(backend, tmp_path):
    batch = backend.collate([backend.encode(s) for s in random_samples(3)])
    backend.model.eval()
    with torch.no_grad():
        before = backend.model(**batch).logits
    path = backend.save(tmp_path / "tiny")
    assert (path / "model.safetensors").exists()
    assert not list(path.glob("*.bin"))
    loaded = TinyBackend.load(path)
    with torch.no_grad():
        after = loaded.model(**batch).logits
    torch.testing.assert_close(before, after)
    assert loaded.tokenizer.get_vocab() == backend.tokenizer.get_vocab()
    assert loaded.spec == backend.spec


def test_load_keeps_the_numpy_image_processor_whatever_transformers_resolves(backend, tmp_path, monkeypatch):
    """On a machine where torchvision imports, `from_pretrained` gives transformers' torchvision image
    processor, whose `normalize` refuses the arrays `encode` passes (seen on a lent GPU machine);
    `load` puts back the numpy one `build` made, with the same settings."""
    from hpelib.backends.qwen2_vl import ImageOnlyQwen2VLProcessor

    class TensorsOnly:  # what the torchvision processor does with a numpy image
        def __getattr__(self, name):
            raise TypeError(f"{name}: tensors only")

    path = backend.save(tmp_path / "tiny")
    resolve = ImageOnlyQwen2VLProcessor.from_pretrained

    def torchvision_like(*args, **kwargs):
        processor = resolve(*args, **kwargs)
        processor.image_processor = TensorsOnly()
        return processor

    monkeypatch.setattr(ImageOnlyQwen2VLProcessor, "from_pretrained", torchvision_like)
    loaded = TinyBackend.load(path)
    assert type(loaded.image_processor) is type(backend.image_processor)
    assert loaded.image_processor.to_dict() == backend.image_processor.to_dict()
    sample = random_samples(1)[0]
    torch.testing.assert_close(loaded.encode(sample)["pixel_values"], backend.encode(sample)["pixel_values"])


def test_patch_projection_is_the_convolution_computed_as_a_matrix_product(backend, tmp_path):
    proj = backend.model.model.visual.patch_embed.proj
    assert type(proj) is PatchProjection  # swapped in by the backend, built or loaded
    assert type(TinyBackend.load(backend.save(tmp_path / "tiny")).model.model.visual.patch_embed.proj) is PatchProjection
    conv = torch.nn.Conv3d(3, 16, kernel_size=(2, 8, 8), stride=(2, 8, 8))
    patches = torch.randn(5, 3, 2, 8, 8)
    want = conv(patches)
    want.square().sum().backward()
    want_grads = [p.grad.clone() for p in conv.parameters()]
    conv.zero_grad()
    keys = set(conv.state_dict())
    same = PatchProjection.replace(conv)
    got = same(patches)
    got.square().sum().backward()
    assert same is conv and set(same.state_dict()) == keys  # saved exactly as before
    torch.testing.assert_close(got, want)
    for p, g in zip(same.parameters(), want_grads):
        torch.testing.assert_close(p.grad, g)
    assert same(torch.randn(1, 3, 4, 16, 16)).shape == (1, 16, 2, 2, 2)  # a larger input: the plain convolution
    with pytest.raises(ValueError, match="stride == kernel"):
        PatchProjection.replace(torch.nn.Conv3d(3, 16, kernel_size=3, stride=1))


def test_the_faster_attention_gives_the_stock_models_logits_and_gradients(backend, tmp_path):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention

    model = backend.model
    blocks = model.model.visual.blocks
    assert all(type(b.attn) is UniformVisionAttention for b in blocks)  # swapped in, built or loaded
    loaded = TinyBackend.load(backend.save(tmp_path / "tiny")).model
    assert all(type(b.attn) is UniformVisionAttention for b in loaded.model.visual.blocks)
    assert loaded.config.text_config._attn_implementation == "eager"
    batch = backend.collate([backend.encode(s) for s in random_samples(4)])
    with torch.no_grad():  # attention that matters: at init the tower's outputs barely depend on it
        for b in blocks:
            b.attn.qkv.weight.normal_(0.0, 1.0)

    def outputs_and_grads():
        model.zero_grad()
        tower = model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).last_hidden_state
        out = model(**batch)
        out.loss.backward()
        return tower.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model.train()
    fast_tower, fast, fast_grads = outputs_and_grads()
    for b in blocks:
        b.attn.__class__ = Qwen3VLVisionAttention
    model.set_attn_implementation({"text_config": "sdpa"})
    stock_tower, stock, stock_grads = outputs_and_grads()
    model.eval()
    torch.testing.assert_close(fast_tower, stock_tower)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-4)
    assert len(fast_grads) == len(stock_grads) == len(list(model.parameters()))
    for got, want in zip(fast_grads, stock_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    # images of different sizes in one packed sequence take the stock per-image path (`attn` is the stock
    # class again here)
    attn = blocks[0].attn
    x = torch.randn(10, attn.qkv.in_features)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    rot = torch.randn(10, attn.head_dim // 2)
    pos = (torch.cat([rot, rot], -1).cos(), torch.cat([rot, rot], -1).sin())
    want = attn(x, cu, pos)
    torch.testing.assert_close(UniformVisionAttention.replace(attn)(x, cu, pos), want)
    with pytest.raises(ValueError, match="Qwen3VLVisionAttention"):
        UniformVisionAttention.replace(torch.nn.Linear(2, 2))


def patches_of(backend, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The image processor's normalised `(C, H, W)` pixels of `image`, and the patch rows the
    backend's own encoding gives the model."""
    ip = backend.image_processor
    pixels = ip.normalize(ip.rescale(image.transpose(2, 0, 1), ip.rescale_factor), ip.image_mean, ip.image_std)
    rows = backend.encode(Sample(image, prompts.HPE_PROMPT, None, "hpe"))["pixel_values"]
    return torch.from_numpy(pixels).float(), rows.float()


def test_conv_stem_sees_the_patches_as_the_image_they_came_from(config):
    backend = TinyBackend.build(config, spec=dataclasses.replace(MICRO, stem="conv"), seed=0)
    stem = backend.model.model.visual.patch_embed.stem
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    pixels, rows = zip(*(patches_of(backend, im) for im in images))
    rows = torch.cat(rows)  # two images' patch rows, one after the other, as a batch has them
    torch.testing.assert_close(stem.images(rows), torch.stack(pixels))
    # a map of one value per patch goes back to that patch's row: the mean of the patch's pixels
    per_patch = torch.nn.functional.avg_pool2d(stem.images(rows), 16).mean(dim=1, keepdim=True)
    torch.testing.assert_close(stem.tokens(per_patch)[:, 0], rows.mean(dim=1))
    with pytest.raises(ValueError, match="not whole images"):
        stem(rows[:5])


def test_a_conv_stem_model_starts_as_the_plain_one_and_saves_and_loads(config, tmp_path):
    plain = TinyBackend.build(config, spec=MICRO, seed=0)
    backend = TinyBackend.build(config, spec=dataclasses.replace(MICRO, stem="conv"), seed=0)
    batch = backend.collate([backend.encode(s) for s in random_samples(3)])
    backend.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(backend.model(**batch).logits, plain.model.eval()(**batch).logits)
        for p in backend.model.model.visual.patch_embed.stem.parameters():
            p.add_(0.1 * torch.randn_like(p))
        before = backend.model(**batch).logits
    assert not torch.allclose(before, plain.model(**batch).logits, atol=1e-3)  # the stem now adds features
    loaded = TinyBackend.load(backend.save(tmp_path / "stem"))
    assert loaded.spec == backend.spec and isinstance(loaded.model.model.visual.patch_embed.stem, ConvStem)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**batch).logits, before)


def test_a_conv_stem_spec_without_its_weights_is_refused_naming_the_file(config, tmp_path):
    path = TinyBackend.build(config, spec=MICRO, seed=0).save(tmp_path / "plain")
    saved = json.loads((path / BACKEND_FILE).read_text())
    saved["spec"]["stem"] = "conv"
    (path / BACKEND_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"model\.safetensors.*does not fit.*missing"):
        TinyBackend.load(path)


def test_a_saved_spec_this_code_does_not_know_is_refused_naming_the_file(config, tmp_path):
    path = TinyBackend.build(config, spec=MICRO, seed=0).save(tmp_path / "newer")
    saved = json.loads((path / BACKEND_FILE).read_text())
    saved["spec"]["text_first"] = True  # a field of a later (or an experiment's) TinySpec
    (path / BACKEND_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=re.escape(str(path / BACKEND_FILE)) + ".*text_first"):
        TinyBackend.load(path)


def test_tiny_spec_refuses_an_unknown_stem_and_wrong_stem_widths():
    with pytest.raises(ValueError, match="stem must be one of"):
        TinySpec(stem="cnn")
    with pytest.raises(ValueError, match="stem_widths.*3 widths"):
        TinySpec(stem="conv", stem_widths=[32, 64])


def test_generate_returns_answers_the_parser_reads(backend):
    samples = random_samples(3)
    answers = backend.generate(samples, max_new_tokens=12)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    for a, s in zip(answers, samples):
        assert prompts.parse_response(a, task=s.task).kind in prompts.KINDS


def test_generate_reproduces_a_memorised_answer(backend):
    """After overfitting one sample, greedy decoding (KV cache on) writes it exactly."""
    s = random_samples(2)[1]
    batch = backend.collate([backend.encode(s)])
    opt = torch.optim.AdamW(backend.model.parameters(), lr=5e-3)
    backend.model.train()
    for _ in range(60):
        backend.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert backend.generate([s], max_new_tokens=24) == [s.answer]


def test_lora_targets_language_and_vision_linears(backend):
    from peft import LoraConfig, get_peft_model

    names = [n for n, m in backend.model.named_modules() if isinstance(m, torch.nn.Linear)]
    lang = re.compile(backend.lora_target_modules(language=True, vision=False))
    vis = re.compile(backend.lora_target_modules(language=False, vision=True))
    lang_hits = [n for n in names if lang.fullmatch(n)]
    vis_hits = [n for n in names if vis.fullmatch(n)]
    assert len(lang_hits) == 7 * MICRO.layers and all(".language_model.layers." in n for n in lang_hits)
    assert len(vis_hits) == 4 * MICRO.vision_depth and all(".visual.blocks." in n for n in vis_hits)
    assert not any("merger" in n for n in vis_hits)  # the (deepstack) mergers only when asked:
    proj = re.compile(backend.lora_target_modules(language=False, vision=False, projector=True))
    proj_hits = [n for n in names if proj.fullmatch(n)]
    assert sorted(proj_hits) == sorted(f"model.visual.{m}.linear_fc{i}" for i in (1, 2) for m in
                                       ["merger"] + [f"deepstack_merger_list.{k}" for k in range(len(MICRO.deepstack))])
    assert "lm_head" not in lang_hits + vis_hits
    with pytest.raises(ValueError):
        backend.lora_target_modules(language=False, vision=False)
    peft_model = get_peft_model(backend.model, LoraConfig(r=2, lora_alpha=4,
                                                          target_modules=backend.lora_target_modules()))
    wrapped = {n.split(".lora_A")[0] for n, _ in peft_model.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == len(lang_hits) + len(vis_hits)


def test_the_saved_tiny_model_is_a_hub_style_qwen3_vl_folder(backend, tmp_path):
    """The `qwen2_vl` backend reads the saved embedded model as it reads a hub folder: one code path."""
    qwen = get_backend_class("qwen2_vl").load(backend.save(tmp_path / "tiny"))
    assert type(qwen.model).__name__ == "Qwen3VLForConditionalGeneration"
    batch = backend.collate([backend.encode(s) for s in random_samples(2)])
    assert qwen.collate([qwen.encode(s) for s in random_samples(2)])["input_ids"].equal(batch["input_ids"])
    backend.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(qwen.model(**batch).logits, backend.model(**batch).logits)
    assert qwen.lora_target_modules(language=True, vision=True) == backend.lora_target_modules()


def test_generation_budget_follows_the_reference_answers_in_the_backends_tokens(backend):
    from hpelib.evaluate import FALLBACK_MAX_NEW_TOKENS, answer_token_budget

    samples = random_samples(4)
    # a head-pose answer is 15 tiny tokens (the tokenizer test above): 1.5 x 15, rounded up, + the end token
    assert answer_token_budget(backend, samples) == 24
    assert answer_token_budget(backend, samples[::2]) == 15  # box answers only: 9 tokens
    unanswered = [Sample(s.image, s.prompt, None, s.task) for s in samples]
    assert answer_token_budget(backend, unanswered) == FALLBACK_MAX_NEW_TOKENS


def _angle_rows_with(config, **spec_fields):
    """A plain micro model, one built with `spec_fields` from the same seed, the angle values
    -180..180, their token ids, and how the coded model's output rows for them differ."""
    plain = TinyBackend.build(config, spec=MICRO, seed=0)
    coded = TinyBackend.build(config, spec=dataclasses.replace(MICRO, **spec_fields), seed=0)
    values = list(range(-180, 181))
    ids = [plain.tokenizer.convert_tokens_to_ids(str(v)) for v in values]
    return plain, coded, values, ids, (coded.model.lm_head.weight - plain.model.lm_head.weight)[ids].detach()


def test_ordinal_number_rows_let_a_linear_read_out_pick_any_angle(config):
    """`TinySpec.number_code`: the rows of the angle tokens differ from the plain ones by a
    parabola in the value, so a hidden state `mu/180 e1 + e2` makes `mu` the most likely angle."""
    plain, coded, values, ids, diff = _angle_rows_with(config, number_code=0.5)
    assert torch.allclose(coded.model.get_input_embeddings().weight[ids] - plain.model.get_input_embeddings().weight[ids],
                          diff)
    assert torch.linalg.matrix_rank(diff[81:280]).item() == 2  # -99..99: one plane (100..180 are box values too)
    d90, dm90 = diff[values.index(90)], diff[values.index(-90)]
    e1 = (d90 - dm90) / 0.5  # u = +-1/2 at +-90
    e2 = -(d90 + dm90) / (0.5 * 0.25)  # u^2 / 2 = 1/8
    for mu in (-90, 0, 45, 170):
        logits = diff @ (mu / 180 * e1 + e2)
        assert values[int(logits.argmax())] == mu
    other = [i for t, i in plain.tokenizer.get_vocab().items() if t.isalpha()]
    assert torch.equal(coded.model.lm_head.weight[other], plain.model.lm_head.weight[other])  # words untouched


def test_circular_angle_rows_turn_the_most_likely_angle_with_the_hidden_state(config):
    """`TinySpec.angle_circle`: the angle tokens' output rows differ from the plain ones by a point
    on a circle of that radius at the token's angle, so a hidden state pointing at `mu` in that
    plane makes `mu` the most likely angle, for any `mu`, and -180 and 180 are neighbours."""
    plain, coded, values, ids, diff = _angle_rows_with(config, angle_circle=2.0)
    assert torch.allclose(diff.norm(dim=1), torch.full((len(ids),), 2.0), atol=1e-5)  # all on the circle
    assert torch.linalg.matrix_rank(diff).item() == 2
    e1, e2 = diff[values.index(0)] / 2.0, diff[values.index(90)] / 2.0
    assert abs(float(e1 @ e2)) < 1e-5
    for mu in (-180, -97, -3, 0, 41, 135):
        h = np.cos(np.radians(mu)) * e1 + np.sin(np.radians(mu)) * e2
        assert values[int((diff @ h.float()).argmax())] in ({-180, 180} if abs(mu) == 180 else {mu})
    assert torch.equal(coded.model.get_input_embeddings().weight, plain.model.get_input_embeddings().weight)
    other = [i for t, i in plain.tokenizer.get_vocab().items() if t.isalpha()]
    assert torch.equal(coded.model.lm_head.weight[other], plain.model.lm_head.weight[other])  # words untouched


def test_answer_loss_is_the_models_own_loss_with_fewer_logits(backend):
    """`train.answer_loss` projects onto the vocabulary only where a label follows: the same loss
    and the same gradients as `model(**batch).loss`, on a batch mixing both tasks (padded)."""
    from hpelib import train

    assert backend.answer_logits_only
    batch = backend.collate([backend.encode(s) for s in random_samples(4)])
    backend.model.train()
    torch.manual_seed(0)
    own = backend.model(**batch).loss
    own.backward()
    own_grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    backend.model.zero_grad()
    torch.manual_seed(0)
    mine = train.answer_loss(backend.model, batch)
    mine.backward()
    torch.testing.assert_close(mine, own)
    for n, p in backend.model.named_parameters():
        if n in own_grads:
            torch.testing.assert_close(p.grad, own_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert "labels" in batch  # the caller's batch is left as it was
