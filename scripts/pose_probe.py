"""Does a tiny base's representation carry head pose? A linear probe on frozen features.

    python scripts/pose_probe.py data/cache/base-<key>/model [--n 1600]

Renders `n` synth-train scenes (head-pose prompt), takes the hidden states of the 16 image tokens
after every decoder layer (`img_L0` = the vision tower's output as the decoder receives it), of
the one image token where the head's centre is (`head_L<k>`), and those at the answer's ` yaw:`
token (`yaw_L<k>`: what the position that writes the yaw knows), and
fits ridge regression from them to yaw/pitch/roll on 80 % of the scenes; prints the held-out MAE
per layer for the given base and for a randomly initialised model of the same spec (the control:
random features also carry some pose). docs/tiny_backend.md reports what it found.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from hpelib import train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks
from hpelib.vision_pretrain import cell_index, merged_grid


def image_token_features(backend: TinyBackend, samples: list, batch: int = 50) -> dict[str, np.ndarray]:
    """`img_L<k>` -> `(n, tokens * hidden)`: the image tokens' hidden states after layer k;
    `head_L<k>` -> `(n, hidden)`: those of the one image token whose cell holds the head box's
    centre (what an attention read-out can select; a linear map on all tokens at once has to learn
    the pose anew for every cell the head may sit in);
    `yaw_L<k>` -> `(n, hidden)`: the hidden state after layer k where the answer's ` yaw:` is read
    (teacher-forced), the one position the angle is written from."""
    backend.model.eval()
    image_id = backend.model.config.image_token_id
    yaw_id = backend.tokenizer.convert_tokens_to_ids(" yaw:")
    grid = merged_grid(backend)
    cells = torch.tensor([cell_index((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, grid) for b in (s.meta["box"] for s in samples)])
    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            b = backend.collate([backend.encode(s) for s in samples[i:i + batch]])
            b.pop("labels", None)
            hidden = backend.model(**b, output_hidden_states=True).hidden_states
            mask = b["input_ids"] == image_id
            at_yaw = b["input_ids"] == yaw_id  # the position that predicts the yaw (causal: it sees the box, not the angles)
            for k, h in enumerate(hidden):
                tokens = h[mask].reshape(len(mask), backend.num_image_tokens, -1)
                out.setdefault(f"img_L{k}", []).append(tokens.reshape(len(mask), -1).numpy())
                out.setdefault(f"head_L{k}", []).append(tokens[torch.arange(len(mask)), cells[i:i + batch]].numpy())
                out.setdefault(f"yaw_L{k}", []).append(h[at_yaw].reshape(len(at_yaw), -1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def ridge_mae(x: np.ndarray, y: np.ndarray, n_train: int, lambdas=(1, 10, 100, 1000, 10000)) -> tuple[np.ndarray, float]:
    """Held-out MAE per angle of the best ridge fit (lambda chosen on the held-out part: an upper
    bound on what a linear read-out can do, which is what the comparison needs)."""
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    a, mean = x[:n_train], y[:n_train].mean(0)
    best = None
    gram = a @ a.T  # the dual form: an n x n solve, not d x d (64 image tokens give d = 12,288)
    for lam in lambdas:
        alpha = np.linalg.solve(gram + lam * np.eye(len(a)), y[:n_train] - mean)
        mae = np.abs(x[n_train:] @ (a.T @ alpha) + mean - y[n_train:]).mean(0)
        if best is None or mae.mean() < best[0].mean():
            best = (mae, lam)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--n", type=int, default=1600)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = make_config("default")
    renderer = train.make_renderer(config)
    samples = [tasks.task_hpe(renderer.render(np.random.default_rng([7, i])), None) for i in range(a.n)]
    y = np.array([[s.meta[k] for k in ("yaw", "pitch", "roll")] for s in samples], float)
    n_train = int(0.8 * a.n)
    const = np.abs(y[n_train:] - np.median(y[:n_train], 0)).mean(0)
    print(f"constant guess (median): MAE y/p/r {const.round(1)} mean {const.mean():.1f}")
    base = TinyBackend.load(a.base_dir)
    for name, backend in (("base", base), ("random init", TinyBackend.build(config, spec=base.spec))):
        for key, x in image_token_features(backend, samples).items():
            mae, lam = ridge_mae(x, y, n_train)
            print(f"{name:11s} {key}: MAE y/p/r {mae.round(1)} mean {mae.mean():.1f} (lambda {lam})", flush=True)


if __name__ == "__main__":
    main()
