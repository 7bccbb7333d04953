"""Does a tiny base's answer look at the object it is asked for? Attention over the image tokens.

    python scripts/object_attention.py data/cache/base-<key>/model [--n 200]

Teacher-forces `n` held-out grounding samples of each kind (the head; one uniquely named object)
and, in every decoder layer, averages the heads' attention from the position that writes the box's
first value (the `[[` token) over the image tokens. It prints how often the most-attended image
token is the one whose cell holds the target's centre (chance: one in the number of image tokens)
and the attention share that token gets. An object the answer attends to but boxes badly is a
read-out problem; one it does not attend to is a retrieval problem (docs/tiny_backend.md, "A tower
trained twice as long").
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from hpelib import train
from hpelib import vision_pretrain as vp
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks


def samples_of(kind: str, renderer, n: int) -> list:
    out, i = [], 0
    while len(out) < n:
        rng = np.random.default_rng([13, i])
        i += 1
        scene = renderer.render(rng)
        sample = tasks.task_box_object(scene, rng) if kind == "object" else tasks.task_box_head(scene, rng)
        if sample is not None:
            out.append(sample)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--n", type=int, default=200)
    a = p.parse_args()
    backend = TinyBackend.load(a.base_dir)
    backend.model.eval()
    renderer = train.make_renderer(make_config("default"))
    grid = vp.merged_grid(backend)
    image_id, open_id = backend.model.config.image_token_id, backend.tokenizer.convert_tokens_to_ids("[[")
    for kind in ("head", "object"):
        samples = samples_of(kind, renderer, a.n)
        hits, share = None, None
        with torch.no_grad():
            for i in range(0, len(samples), 50):
                chunk = samples[i:i + 50]
                batch = backend.collate([backend.encode(s) for s in chunk])
                batch.pop("labels")
                attentions = backend.model(**batch, output_attentions=True).attentions
                if hits is None:
                    hits, share = np.zeros(len(attentions)), np.zeros(len(attentions))
                for r, sample in enumerate(chunk):
                    x0, y0, x1, y1 = sample.meta["box"]
                    cell = vp.cell_index((x0 + x1) / 2, (y0 + y1) / 2, grid)
                    ids = batch["input_ids"][r]
                    image = (ids == image_id).nonzero().flatten()
                    at = int((ids == open_id).nonzero().flatten()[0])
                    for layer, att in enumerate(attentions):
                        over_image = att[r, :, at, image].mean(0)
                        hits[layer] += int(over_image.argmax()) == cell
                        share[layer] += float(over_image[cell] / over_image.sum())
        print(f"{kind}: the most-attended image token is the target's cell (chance {1 / grid ** 2:.0%}); "
              f"its share of the attention over the image")
        for layer in range(len(hits)):
            print(f"  layer {layer}: {hits[layer] / len(samples):4.0%}  {share[layer] / len(samples):.2f}")


if __name__ == "__main__":
    main()
