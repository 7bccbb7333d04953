"""Every path the project uses, in one place (STYLE.md 12).

`HPE_ROOT` overrides the project root (tests point it at a temporary folder); `HPE_DATA_DIR` and
`HPE_RUNS_DIR` override the data and runs folders alone.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The repository root: the folder holding `notebooks/`, `data/` and `runs/`."""
    return Path(os.environ.get("HPE_ROOT", PACKAGE_DIR.parent)).resolve()


def notebooks_dir() -> Path:
    return Path(os.environ.get("HPE_NOTEBOOKS_DIR", PACKAGE_DIR.parent / "notebooks")).resolve()


def data_dir() -> Path:
    """Generated and downloaded data (never committed)."""
    return Path(os.environ.get("HPE_DATA_DIR", project_root() / "data")).resolve()


def assets_dir() -> Path:
    """Third-party assets fetched on first use (the menpo3d head scan)."""
    return data_dir() / "assets"


def synth_dir() -> Path:
    """Rendered SynthHeads splits, one folder per domain and config hash."""
    return data_dir() / "synth"


def cache_dir() -> Path:
    """Cached artefacts shared between runs (the pre-trained tiny base, keyed by config hash)."""
    return data_dir() / "cache"


def runs_dir() -> Path:
    return Path(os.environ.get("HPE_RUNS_DIR", project_root() / "runs")).resolve()


def run_dir(name_or_path: str | os.PathLike) -> Path:
    """A run folder: a bare name lives under `runs/`; a path is taken as it is."""
    p = Path(name_or_path)
    if p.is_absolute() or len(p.parts) > 1:
        return p.resolve()
    return runs_dir() / p


# Inside one run folder (DESIGN.md "hpelib.workbook"): names every stage agrees on.
RUN_CONFIG = "config.json"  # the resolved configuration of the run
RUN_INFO = "run_info.json"  # versions, git commit, seed
METRICS = "metrics.json"  # flat metrics of every stage, merged
STAGE_METRICS_DIR = "metrics"  # one <stage>.json per notebook, merged into metrics.json
DATASETS = "datasets.json"  # which manifest each domain/split uses
FIGURES_DIR = "figures"
NOTEBOOKS_DIR = "notebooks"
BASE_DIR = "base"  # the base model of the run (a copy of, or pointer to, the cached one)
ADAPTERS_DIR = "adapters"  # one PEFT adapter folder per LoRA
SIMILARITY_DIR = "similarity"
MERGES_DIR = "merges"  # one folder per merged variant
EVAL_DIR = "eval"
REPORT = "report.md"
