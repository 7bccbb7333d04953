"""What does an adapter's answer position say about the angles? Its whole distribution, not just the argmax.

    python scripts/angle_readout.py data/cache/base-<key>/model runs/<run>/adapters/hpe_rehearsal [--n 300]

Teacher-forced on `n` held-out `synth-train` head-pose samples: at the positions that write the
yaw, pitch and roll, the softmax over the 361 angle tokens. Prints per angle the MAE of its argmax
(what greedy decoding writes, given the true box before it), the MAE of its expected value, how
much the expected value varies from image to image against the truth's spread, its correlation
with the truth, and the distribution's entropy (ln 361 = 5.9 for a uniform one; the training
marginal of the yaw is about 5.2). A broad distribution whose expectation barely moves says the
answer position knows little; one whose expectation tracks the truth while the argmax does not says
the read-out is what fails. `none` as the adapter scores the base itself. `--generate` also scores
the greedy answers on the same scenes, as the workbook's held-out checks do (valid rate, pose MAE,
head box Acc@0.5), on more scenes than those checks' 32-64. docs/tiny_backend.md ("The answer's
angle distribution, ...", R1 and R2; G1) reports what it found.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from hpelib import train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks
from hpelib.soft_targets import number_tokens_by_kind

ANGLES = ("yaw", "pitch", "roll")


def angle_distributions(backend: TinyBackend, samples: list, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """`(values, probs)`: the angle tokens' values (-180..180) and `(n, 3, 361)` softmaxes over them
    where each angle is written."""
    angles, _ = number_tokens_by_kind(backend.tokenizer.get_vocab())
    ids = torch.tensor([i for _, i in angles])
    fields = [backend.tokenizer.convert_tokens_to_ids(f" {k}:") for k in ANGLES]
    out = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            enc = backend.collate([backend.encode(s) for s in samples[i:i + batch]])
            enc.pop("labels")
            logits = backend.model(**enc).logits
            rows = torch.arange(len(logits))
            per_field = [logits[rows, (enc["input_ids"] == f).float().argmax(1)][:, ids] for f in fields]
            out.append(torch.stack(per_field, 1).softmax(-1))
    return torch.tensor([v for v, _ in angles], dtype=torch.float), torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("adapter", help="the adapter's folder, or `none` for the base alone")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--generate", action="store_true", help="also score the greedy answers on the same scenes")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = make_config("default")
    renderer = train.make_renderer(config)
    samples = [tasks.task_hpe(renderer.render(np.random.default_rng([7, i])), None) for i in range(a.n)]
    truth = np.array([[s.meta[k] for k in ANGLES] for s in samples], float)
    backend = TinyBackend.load(a.base_dir)
    if a.adapter != "none":
        from peft import PeftModel

        backend.model = PeftModel.from_pretrained(backend.model, a.adapter)
    backend.model.eval()
    values, probs = angle_distributions(backend, samples)
    argmax = values[probs.argmax(-1)].numpy()
    expected = (probs @ values).numpy()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean(0).numpy()
    for j, name in enumerate(ANGLES):
        corr = np.corrcoef(expected[:, j], truth[:, j])[0, 1]
        print(f"{name:5s}: argmax MAE {np.abs(argmax[:, j] - truth[:, j]).mean():5.1f} "
              f"({len(set(argmax[:, j]))} distinct), expected-value MAE {np.abs(expected[:, j] - truth[:, j]).mean():5.1f}, "
              f"its spread {expected[:, j].std():4.1f} (truth {truth[:, j].std():4.1f}), corr {corr:+.2f}, "
              f"entropy {entropy[j]:.2f}")
    print(f"mean : argmax MAE {np.abs(argmax - truth).mean():.1f}, expected-value MAE {np.abs(expected - truth).mean():.1f}")
    if a.generate:
        _, m = train.evaluate_samples(backend, samples)
        print(f"greedy answers ({len(samples)} scenes): valid {m['hpe/valid_rate']:.1%}, head box Acc@0.5 "
              f"{m['hpe/acc50']:.1%}, MAE yaw / pitch / roll {m.get('hpe/mae_yaw', np.nan):.1f} / "
              f"{m.get('hpe/mae_pitch', np.nan):.1f} / {m.get('hpe/mae_roll', np.nan):.1f}, "
              f"mean {m.get('hpe/mae_mean', np.nan):.1f}")


if __name__ == "__main__":
    main()
