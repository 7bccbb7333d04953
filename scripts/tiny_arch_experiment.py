"""The architecture runs of docs/tiny_backend.md (Q1-Q5): a tiny VLM trained from scratch on the base
curriculum, scored on 64 held-out grounding scenes every 200 steps.

    OMP_WAIT_POLICY=PASSIVE python scripts/tiny_arch_experiment.py --name q3ds --arch qwen3 --minutes 20
    OMP_WAIT_POLICY=PASSIVE python scripts/tiny_arch_experiment.py --name q2 --arch qwen2 --minutes 12 [--digits]

`qwen3` is the tiny backend as built (`TinySpec`, deepstack from `--deepstack`); `qwen2` is
the same sizes in `Qwen2VLForConditionalGeneration`, whose vision tower has rotary positions only;
`--digits` makes every digit a token instead of every number. Writes runs/experiments/<name>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from hpelib import io, paths, train
from hpelib.backends import tiny
from hpelib.backends.qwen2_vl import CHAT_TEMPLATE, SPECIAL_TOKENS, ImageOnlyQwen2VLProcessor, Qwen2VLBackend
from hpelib.config import make_config
from hpelib.data import tasks


def qwen2_backend(config, spec: tiny.TinySpec, tokenizer) -> Qwen2VLBackend:
    """The tiny spec's sizes in Qwen2-VL (no absolute patch positions)."""
    import transformers

    size = config.data.image_size
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    q3 = spec.qwen3_vl_config(len(tokenizer), size, ids)
    text = q3.text_config.to_dict()
    hd = spec.hidden_size // spec.heads
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": spec.rope_theta,
                               "mrope_section": [hd // 8, (hd // 2 - hd // 8) // 2, hd // 2 - hd // 8 - (hd // 2 - hd // 8) // 2]}
    vision = dict(depth=spec.vision_depth, embed_dim=spec.vision_dim, hidden_size=spec.hidden_size,
                  num_heads=spec.vision_heads, mlp_ratio=spec.vision_intermediate_size // spec.vision_dim,
                  patch_size=spec.patch_size, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config2 = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=q3.image_token_id,
                                         video_token_id=q3.video_token_id,
                                         vision_start_token_id=q3.vision_start_token_id,
                                         vision_end_token_id=q3.vision_end_token_id)
    torch.manual_seed(config.seed)
    model = transformers.Qwen2VLForConditionalGeneration(config2)
    processor = ImageOnlyQwen2VLProcessor(image_processor=tiny._image_processor(size, spec.patch_size),
                                          tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    return Qwen2VLBackend(model, processor)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--arch", choices=["qwen3", "qwen2"], default="qwen3")
    p.add_argument("--digits", action="store_true", help="one token per digit instead of per number")
    p.add_argument("--deepstack", default="1,2", help="vision blocks feeding the first LM layers ('' for none)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = make_config("default", {"base.minutes": a.minutes, "base.eval_every": 200, "base.eval_samples": 64,
                                     "base.checkpoint_every": 100_000})
    spec = tiny.TinySpec(deepstack=[int(x) for x in a.deepstack.split(",") if x])
    if a.digits:
        tiny.PRETOKEN_PATTERN = tiny.PRETOKEN_PATTERN.replace("-?[0-9]{1,3}", "[0-9]")
        tiny._PRETOKEN_RE = tiny.re.compile(tiny.PRETOKEN_PATTERN)
    tokenizer = tiny.build_tokenizer(tasks.corpus())
    if a.arch == "qwen3":
        backend = tiny.TinyBackend.build(config, spec=spec)
        backend.processor.tokenizer = backend.tokenizer = tokenizer
    else:
        backend = qwen2_backend(config, spec, tokenizer)
    n_params = sum(p.numel() for p in backend.model.parameters())
    out = paths.runs_dir() / "experiments" / a.name
    stream = tasks.SampleStream(train.make_renderer(config), tasks.BASE_MIX, config.base.batch_size, seed=config.seed)
    t0 = time.time()
    history = train.fit(backend, stream, train.base_eval_set(config), config.base, out / "training", desc=a.name)
    evals = history.dropna(subset=["box_head/acc50"])
    print(evals[["step", "loss", "elapsed_s", "box_head/acc50", "box_object/acc50", "valid_rate"]].to_string())
    samples = train.base_eval_set(config)[:8]
    for s, answer in zip(samples, backend.generate(samples)):
        print(repr(s.prompt), "->", repr(answer), "true", repr(s.answer))
    io.write_json(out / "experiment.json", {**vars(a), "spec": dataclasses.asdict(spec), "params": n_params,
                                            "wall_s": time.time() - t0,
                                            "final": evals.iloc[-1].dropna().to_dict()})


if __name__ == "__main__":
    main()
