"""The run folder every notebook shares, and (later) the papermill runner over all six notebooks.

A notebook's second cell is `run = open_run(RUN_DIR, PROFILE, overrides)`: it resolves the
configuration, creates `runs/<name>/` and records the configuration there. Each notebook's last
cell calls `run.save_metrics(stage, {...})`, which writes `metrics/<stage>.json` and refreshes the
flat `metrics.json` (keys like `wta_cosine@0.9999/synth-aflw/mae_mean`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpelib import io, paths
from hpelib.config import Config, config_from_dict, make_config


@dataclass
class Run:
    """An opened run folder and its resolved configuration."""

    dir: Path
    config: Config

    def path(self, *parts: str) -> Path:
        """A path inside the run folder (parent folders created)."""
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def figures(self) -> Path:
        d = self.dir / paths.FIGURES_DIR
        d.mkdir(parents=True, exist_ok=True)
        return d

    def save_metrics(self, stage: str, metrics: dict[str, Any]) -> Path:
        """Write one stage's flat metrics and merge every stage's into `metrics.json`."""
        for key, value in metrics.items():
            if not isinstance(key, str) or not isinstance(value, (int, float, str, bool, type(None))):
                raise ValueError(f"metrics of stage {stage!r}: {key!r} -> {value!r} is not a flat str -> number entry")
        io.write_json(self.path(paths.STAGE_METRICS_DIR, f"{stage}.json"), metrics)
        merged: dict[str, Any] = {}
        for f in sorted((self.dir / paths.STAGE_METRICS_DIR).glob("*.json")):
            merged.update(io.read_json(f))
        return io.write_json(self.dir / paths.METRICS, merged)

    def load_metrics(self) -> dict[str, Any]:
        p = self.dir / paths.METRICS
        return io.read_json(p) if p.exists() else {}


def open_run(run_dir: str | os.PathLike = "", profile: str = "default",
             overrides: dict[str, Any] | None = None) -> Run:
    """Open (creating if needed) a run folder and resolve its configuration.

    Args:
        run_dir: a name under `runs/` or a path; empty means `runs/<profile>`.
        profile: a name in `hpelib.config.PROFILES`.
        overrides: dotted config keys -> values; `None` values are ignored.

    The resolved configuration is written to `config.json`. A notebook run alone on an existing
    folder with other settings rewrites it, and says so, so the folder always tells what made it.
    """
    config = make_config(profile, overrides)
    d = paths.run_dir(run_dir or profile)
    d.mkdir(parents=True, exist_ok=True)
    cfg_path = d / paths.RUN_CONFIG
    if cfg_path.exists():
        previous = config_from_dict(io.read_json(cfg_path))
        if previous != config:
            changed = _diff(previous.to_dict(), config.to_dict())
            print(f"note: {cfg_path} had other settings; now {', '.join(changed)}")
    io.write_json(cfg_path, config.to_dict())
    return Run(dir=d, config=config)


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}={vb!r} (was {va!r})")
    return out
