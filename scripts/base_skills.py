"""What a tiny base answers on each curriculum task: exact-match rate and its most common answers.

    python scripts/base_skills.py data/cache/base-<key>/model [--n 40] [--train-domain JSON]

A base that answers one constant per task (docs/tiny_backend.md) has learned nothing but its
grounding; this prints the evidence.
"""

from __future__ import annotations

import argparse
import collections

from hpelib import evaluate, train
from hpelib.backends.tiny import TinyBackend
from hpelib.config import make_config
from hpelib.data import tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base_dir")
    p.add_argument("--n", type=int, default=40, help="held-out samples per task")
    p.add_argument("--train-domain", help='JSON synth-train DomainSpec fields, e.g. \'{"n_objects": [1, 1]}\'')
    a = p.parse_args()
    if a.train_domain:
        import json

        from hpelib.data import synth
        synth.override_domain("synth-train", json.loads(a.train_domain))
    config = make_config("default")
    names = ("colour", "count", "orient", "box_object", "box_head")
    samples = tasks.eval_set(train.make_renderer(config), {t: a.n for t in names}, seed=config.seed)
    answers = evaluate.generate_answers(TinyBackend.load(a.base_dir), samples, batch_size=40)
    table = train.score_answers(samples, answers)  # names box tasks by target kind (box_head, box_object)
    for task, g in table.groupby("task", sort=False):
        exact = (g["answer"].str.strip() == g["truth"].str.strip()).mean()
        common = collections.Counter(g["answer"]).most_common(3)
        print(f"{task:11s} exact {exact:4.0%}  most common answers {common}")


if __name__ == "__main__":
    main()
