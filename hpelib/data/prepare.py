"""The datasets of one run (`00_prepare_data`): build or reuse every split, record them in the run.

`prepare_datasets(config, run_dir)` renders the SynthHeads splits the configuration names (reused
from `data/synth/` when already built) or reads the real datasets from their published layouts
when their roots are given, and writes `datasets.json` into the run folder: one entry per split,
so every later notebook finds the same data with `load_datasets(run_dir)`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from hpelib import io, paths
from hpelib.config import Config
from hpelib.data import real, synth

# Real datasets: the name they take in tables and metrics, and their reader.
REAL_TRAIN = "300w-lp"
REAL_TESTS = {"aflw2000": "root_aflw2000", "biwi": "biwi_npz"}
# Columns every split's table has (DESIGN.md), whatever its source.
COLUMNS = ["image", "yaw", "pitch", "roll", "x0", "y0", "x1", "y1", "domain"]


def uses_real_data(config: Config) -> bool:
    d = config.data
    return bool(d.root_300wlp or d.root_aflw2000 or d.biwi_npz)


def prepare_datasets(config: Config, run_dir: str | os.PathLike, progress: bool = True) -> pd.DataFrame:
    """Build or reuse every split of the run and record them in `<run_dir>/datasets.json`.

    Synthetic world: a `train` split of `data.n_train` scenes of `data.train_domain` and a held-out
    `test` split of `data.n_test` scenes for each of `data.test_domains` (`synth-train` there means
    unseen scenes of the training domain).
    Real world (any of `data.root_300wlp`, `data.root_aflw2000`, `data.biwi_npz` set): 300W-LP is the
    training split, AFLW2000 and BIWI the test splits, read from their published layouts (never
    modified) and written as manifests into the run folder.

    Returns:
        One row per split: `role` (train/test), `domain`, `n`, `source`, `manifest`, `seconds`.
    """
    run_dir = Path(run_dir)
    if config.profile == "real" and not uses_real_data(config):
        raise ValueError("profile 'real' needs the datasets' roots: set data.root_300wlp, and data.root_aflw2000 "
                         "and/or data.biwi_npz (notebook parameters ROOT_300WLP, ROOT_AFLW2000, BIWI_NPZ)")
    entries = _prepare_real(config, run_dir, progress) if uses_real_data(config) else _prepare_synth(config, progress)
    io.write_json(run_dir / paths.DATASETS, entries)
    return pd.DataFrame(entries)


def _prepare_synth(config: Config, progress: bool) -> list[dict]:
    d = config.data
    wanted = [("train", d.train_domain, "train", d.n_train)]
    wanted += [("test", domain, "test", d.n_test) for domain in d.test_domains]
    entries = []
    for role, domain, split, n in wanted:
        start = time.perf_counter()
        folder = synth.build_split(domain, split, n, d.image_size, d.seed, decimals=config.angle_decimals,
                                   progress=progress)
        entries.append({"role": role, "domain": domain, "n": n, "source": "synth",
                        "manifest": str(folder), "seconds": round(time.perf_counter() - start, 2)})
    return entries


def _prepare_real(config: Config, run_dir: Path, progress: bool) -> list[dict]:
    d = config.data
    if not d.root_300wlp:
        raise ValueError("data.root_300wlp is empty: the real world trains on 300W-LP; set it to the folder "
                         "holding AFW/, HELEN/, IBUG/, LFPW/ (and their _Flip twins)")
    if not (d.root_aflw2000 or d.biwi_npz):
        raise ValueError("no real test set: set data.root_aflw2000 (the AFLW2000 folder of .jpg + .mat) "
                         "and/or data.biwi_npz (BIWI_noTrack.npz)")
    # The 300W-LP protocol also drops |angle| > 99 (6DRepNet's create_filename_list.py).
    readers = [("train", REAL_TRAIN, lambda: real.read_300wlp(d.root_300wlp, skip_bad=d.skip_bad_files,
                                                               max_abs_angle=config.eval.max_abs_angle,
                                                               progress=progress))]
    if d.root_aflw2000:
        readers.append(("test", "aflw2000", lambda: real.read_aflw2000(
            d.root_aflw2000, skip_bad=d.skip_bad_files, max_abs_angle=config.eval.max_abs_angle, progress=progress)))
    if d.biwi_npz:
        readers.append(("test", "biwi", lambda: real.read_biwi(
            d.biwi_npz, skip_bad=d.skip_bad_files, max_abs_angle=config.eval.max_abs_angle)))
    entries = []
    for role, name, read in readers:
        start = time.perf_counter()
        df = read()
        df["domain"] = name
        manifest = run_dir / "data" / f"{name}.jsonl"
        with io.atomic_path(manifest) as tmp:
            df.to_json(tmp, orient="records", lines=True)
        entries.append({"role": role, "domain": name, "n": len(df), "source": "real", "manifest": str(manifest),
                        "seconds": round(time.perf_counter() - start, 2),
                        "skipped": len(df.attrs.get("skipped", [])), "dropped": len(df.attrs.get("dropped", []))})
    return entries


def load_datasets(run_dir: str | os.PathLike) -> dict[str, dict[str, pd.DataFrame]]:
    """The run's splits as tables: `{"train": {domain: df}, "test": {domain: df}}`.

    Raises:
        FileNotFoundError: the run has no `datasets.json` (run `00_prepare_data` first).
    """
    path = Path(run_dir) / paths.DATASETS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no datasets recorded for this run; run notebooks/00_prepare_data first")
    out: dict[str, dict[str, pd.DataFrame]] = {"train": {}, "test": {}}
    for e in io.read_json(path):
        out[e["role"]][e["domain"]] = load_manifest(e)
    return out


def load_manifest(entry: dict) -> pd.DataFrame:
    """One split's table from its `datasets.json` entry."""
    if entry["source"] == "synth":
        return synth.load_split(entry["manifest"])
    df = pd.read_json(entry["manifest"], orient="records", lines=True)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{entry['manifest']}: missing columns {missing}; expected {COLUMNS}")
    return df


def concat_splits(datasets: dict[str, dict[str, pd.DataFrame]]) -> pd.DataFrame:
    """All splits in one table with a `role` column (e.g. for pose histograms per domain)."""
    frames = [df[COLUMNS].assign(role=role, domain=f"{domain} ({role})")
              for role, by_domain in datasets.items() for domain, df in by_domain.items()]
    return pd.concat(frames, ignore_index=True)


def dataset_metrics(splits: pd.DataFrame) -> dict[str, float]:
    """Flat metrics of the data stage: scenes and seconds per split (`data/<role>/<domain>/n`)."""
    out: dict[str, float] = {}
    for row in splits.itertuples():
        out[f"data/{row.role}/{row.domain}/n"] = int(row.n)
        out[f"data/{row.role}/{row.domain}/seconds"] = float(row.seconds)
    return out
