"""The run folder every notebook shares, and the papermill runner over all six notebooks.

A notebook's second cell is `run = open_run(RUN_DIR, PROFILE, OVERRIDES, params)`: it resolves the
configuration, creates `runs/<name>/` and records the configuration there. Each notebook's last
cell calls `run.save_metrics(stage, {...})`, which writes `metrics/<stage>.json` and refreshes the
flat `metrics.json` (keys like `wta_cosine@0.9999/synth-aflw/mae_mean`).

The runner (`python -m hpelib.workbook --help`):

    run     --profile P --name NAME [-p KEY VALUE ...] [--force]   the six notebooks, in order
    compare NAME [NAME ...]                                       side-by-side metrics of runs
    sweep   --profile P -p KEY V1,V2,... [--name PREFIX]          one run per value, then compare
    params                                                        each notebook's parameters

`run` executes `notebooks/00_prepare_data.ipynb` ... `05_evaluate.ipynb` with papermill into
`runs/NAME/notebooks/`, each with the parameters `PROFILE`, `RUN_DIR` (the absolute run folder)
and `OVERRIDES` (every `-p KEY VALUE` whose KEY has a dot: a config override such as
`-p lora.rank 16`). A `-p KEY VALUE` without a dot is a plain notebook parameter, given only to
the notebooks that declare it. VALUE is read as JSON, else as a YAML literal, else kept as text:
`16` -> 16, `[0.999]` -> [0.999], `true` -> True, `abc` -> "abc". The run stops at the first
failing notebook, keeps its executed copy (with the error in it) and says which cell failed.
`runs/NAME/run_info.json` records the parameters, seeds, git commit, versions and per-notebook
times; `runs/NAME/logs/<notebook>.log` holds each notebook's stdout and stderr.

Stage reuse (the rule). After a notebook completes, the runner writes
`runs/NAME/notebooks/<notebook>.stage.json`: the notebook file's SHA-256, the parameters given
to it, the digest of the configuration sections that stage reads (`STAGE_CONFIG_SECTIONS`; the
resolved config, so two spellings of the same setting are the same), and the `run_id`s of every
upstream stage, plus its own new `run_id` and the SHA-256 of its executed copy. A later `run` into
the same folder skips a notebook, keeping its executed copy, when all of these hold:

1. the record exists and its executed copy is there, unchanged (same SHA-256);
2. the notebook file, its parameters and its config sections are the same;
3. every upstream stage is the very execution the record was made after (same `run_id`s), so
   once a stage runs again every later stage runs again too.

So `-p eval.batch_size 16` on a finished run re-runs only `05_evaluate`; `-p merge...` re-runs
`03` to `05`. `--force` re-runs everything. Not covered by the rule: edits of `hpelib` code and
notebooks run by hand on the folder outside the runner (use `--force` after either). Expensive
work shared *between* run folders (the SynthHeads renders and the pre-trained tiny base) is cached
by config hash under `data/` by the stages themselves.

The kernel: notebooks run on the Jupyter kernel `python3` (`--kernel`). The `python3` spec that
ipykernel installs into the virtualenv starts `python`, which jupyter_client replaces by the
interpreter running the runner (`sys.executable`), so `.venv/bin/python -m hpelib.workbook run`
executes every notebook with the virtualenv's python; `run_info.json` records the kernel command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hpelib import io, paths
from hpelib.config import Config, config_from_dict, make_config

if TYPE_CHECKING:  # pandas and papermill are imported where used: `open_run` stays light
    import pandas as pd


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
             overrides: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Run:
    """Open (creating if needed) a run folder and resolve its configuration.

    Args:
        run_dir: a name under `runs/` or a path; empty means `runs/<profile>`.
        profile: a name in `hpelib.config.PROFILES`.
        overrides: dotted config keys -> values (the runner's `-p lora.rank 16`); `None` values
            are ignored.
        params: the notebook's own named parameters by the config key each sets
            (`{"lora.rank": LORA_RANK}`): a value replaces the same key of `overrides`; `None`
            (the parameter left unset) leaves `overrides`' value, or the profile's, in place.

    The resolved configuration is written to `config.json`. A notebook run alone on an existing
    folder with other settings rewrites it, and says so, so the folder always tells what made it.
    """
    set_params = {k: v for k, v in (params or {}).items() if v is not None}
    config = make_config(profile, {**(overrides or {}), **set_params})
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


# =========================================================================== the runner
# The workbook, in order; every run executes all of them (none is optional).
NOTEBOOKS: tuple[str, ...] = (
    "00_prepare_data",
    "01_train_base",
    "02_train_lora",
    "03_layer_similarity",
    "04_merge",
    "05_evaluate",
)
# The config sections each stage reads, on top of what its upstream stages read (their record
# is part of its fingerprint). A notebook not listed here depends on the whole configuration.
STAGE_CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {
    "00_prepare_data": ("seed", "angle_decimals", "data", "model"),
    "01_train_base": ("base",),
    "02_train_lora": ("lora", "baselines"),
    "03_layer_similarity": ("merge",),
    "04_merge": ("merge",),
    "05_evaluate": ("eval",),
}
# The parameters every notebook gets from the runner.
RUNNER_PARAMETERS = ("PROFILE", "RUN_DIR", "OVERRIDES")
LOGS_DIR = "logs"
STAGE_RECORD_SUFFIX = ".stage.json"
KERNEL_NAME = "python3"
# what `compare` and `sweep` show by default
COMPARE_METRICS = ("mae_mean", "valid_rate", "blended_rate", "mae_all", "grounding_acc50")
SWEEP_FIGURE_METRICS = ("mae_mean", "valid_rate")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "papermill", "numpy", "hpelib")


class WorkbookError(RuntimeError):
    """A run could not start or did not finish; the message says what to do."""


# --------------------------------------------------------------------------- parameters
def parse_value(text: str) -> Any:
    """A `-p` value: JSON if it parses, else a YAML literal, else the text itself.

    `"16"` -> 16, `"1e-4"` -> 0.0001, `"[0.999]"` -> [0.999], `"true"` -> True,
    `"null"` -> None, `"abc"` -> "abc". Only what papermill can inject (None, str, bool, int,
    float, list, dict) is kept; anything else (a YAML date) stays text.
    """
    if not isinstance(text, str):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        try:
            import yaml

            value = yaml.safe_load(text)
        except Exception:  # noqa: BLE001 - any YAML error: the value is plain text
            value = text
    return value if _injectable(value) else text


def _injectable(v: Any) -> bool:
    if v is None or isinstance(v, (str, bool, int, float)):
        return True
    if isinstance(v, list):
        return all(_injectable(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _injectable(x) for k, x in v.items())
    return False


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(overrides, plain)`: keys with a dot are config overrides, the others notebook parameters."""
    overrides = {k: v for k, v in params.items() if "." in k}
    plain = {k: v for k, v in params.items() if "." not in k}
    reserved = [k for k in plain if k in RUNNER_PARAMETERS]
    if reserved:
        raise WorkbookError(f"-p {reserved[0]} is set by the runner itself; use --profile / --name, "
                            f"or a dotted config key for OVERRIDES")
    return overrides, plain


def notebook_path(stage: str, notebooks_dir: str | os.PathLike | None = None) -> Path:
    return Path(notebooks_dir or paths.notebooks_dir()) / f"{stage}.ipynb"


def notebook_parameters(path: str | os.PathLike, kernel_name: str = KERNEL_NAME) -> dict[str, dict]:
    """The parameters a notebook declares (papermill's inspection of its `parameters` cell):
    name -> `{name, inferred_type_name, default, help}`."""
    import nbformat
    import papermill

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    if nb.metadata.get("kernelspec", {}).get("name"):
        return papermill.inspect_notebook(path)
    # papermill needs a kernel name to inspect; give it one on a temporary copy
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / path.name
        nbformat.write(nb, tmp_path)
        return papermill.inspect_notebook(tmp_path)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- provenance
def git_info(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """`{"commit": sha or None, "dirty": bool or None}` of the project's git checkout."""
    root = Path(root or paths.project_root())

    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
    return {"commit": commit.strip() if commit else None,
            "dirty": None if status is None else bool(status.strip())}


def package_versions(packages: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (without importing the packages), plus python's."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def kernel_info(kernel_name: str = KERNEL_NAME) -> dict[str, Any]:
    """Which interpreter the notebooks' kernel runs: its spec's command, resolved as
    jupyter_client resolves it (`python` -> this interpreter)."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        spec = KernelSpecManager().get_kernel_spec(kernel_name)
    except Exception as e:  # noqa: BLE001 - reported, not fatal here; papermill fails clearly later
        return {"name": kernel_name, "error": str(e)}
    argv0 = spec.argv[0] if spec.argv else ""
    py_names = {"python", f"python{sys.version_info[0]}", "python%i.%i" % sys.version_info[:2]}
    return {"name": kernel_name, "spec_dir": spec.resource_dir, "argv0": argv0,
            "python": sys.executable if argv0 in py_names else argv0}


# --------------------------------------------------------------------------- stage records
def stage_record_path(run_dir: Path, stage: str) -> Path:
    return run_dir / paths.NOTEBOOKS_DIR / f"{stage}{STAGE_RECORD_SUFFIX}"


def stage_sections(stage: str, config: Config) -> tuple[str, ...]:
    """The config sections in a stage's fingerprint: its `STAGE_CONFIG_SECTIONS` entry; the first
    stage also takes every section no stage lists (a section added later is never ignored); a
    stage not listed takes all (`()`, which `Config.digest` reads as everything)."""
    if stage not in STAGE_CONFIG_SECTIONS:
        return ()
    own = STAGE_CONFIG_SECTIONS[stage]
    if stage == next(iter(STAGE_CONFIG_SECTIONS)):
        listed = {s for secs in STAGE_CONFIG_SECTIONS.values() for s in secs}
        own = own + tuple(k for k in config.to_dict() if k not in listed and k != "profile")
    return own


def stage_inputs(stage: str, notebook: Path, config: Config, plain: dict[str, Any],
                 upstream: list[dict[str, str]]) -> dict[str, Any]:
    """What a stage's result depends on (see the module docstring's reuse rule)."""
    sections = stage_sections(stage, config)
    return {
        "notebook_sha256": _file_sha256(notebook),
        "config_sections": list(sections) or "all",
        "config_digest": config.digest(*sections),
        "parameters": plain,
        "upstream": upstream,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_stage_record(run_dir: Path, stage: str, inputs: dict[str, Any], **times: Any) -> str:
    """Record a completed execution of `stage` (its executed copy must exist); returns its new
    `run_id`, which downstream stages' inputs then name."""
    executed = run_dir / paths.NOTEBOOKS_DIR / f"{stage}.ipynb"
    run_id = uuid.uuid4().hex[:12]
    io.write_json(stage_record_path(run_dir, stage), {
        "stage": stage, "fingerprint": fingerprint(inputs), "inputs": inputs, "run_id": run_id,
        "executed_sha256": _file_sha256(executed), **times})
    return run_id


def reuse_decision(run_dir: Path, stage: str, inputs: dict[str, Any]) -> tuple[bool, str]:
    """`(reusable, why)` for one stage of a run folder, by the module docstring's rule."""
    rec_path = stage_record_path(run_dir, stage)
    executed = run_dir / paths.NOTEBOOKS_DIR / f"{stage}.ipynb"
    if not rec_path.exists():
        return False, "not run before"
    try:
        rec = io.read_json(rec_path)
    except ValueError:
        return False, "unreadable stage record"
    if not executed.exists() or rec.get("executed_sha256") != _file_sha256(executed):
        return False, "executed copy missing or changed"
    old = rec.get("inputs", {})
    if old.get("notebook_sha256") != inputs["notebook_sha256"]:
        return False, "notebook changed"
    if old.get("config_digest") != inputs["config_digest"]:
        return False, f"config changed ({', '.join(inputs['config_sections']) if isinstance(inputs['config_sections'], list) else 'all'})"
    if old.get("parameters") != inputs["parameters"]:
        return False, "parameters changed"
    if old.get("upstream") != inputs["upstream"]:
        return False, "an upstream stage ran again"
    if rec.get("fingerprint") != fingerprint(inputs):
        return False, "fingerprint differs"
    return True, "same notebook, parameters, config and upstream stages"


# --------------------------------------------------------------------------- failures
@dataclass
class Failure:
    """Where a notebook failed."""

    notebook: str
    cell: int | None  # index in the source notebook (0-based), None when unknown
    execution_count: int | None
    source: str  # first line of the failing cell
    exception: str  # "ValueError: ..."
    executed_copy: str
    log: str

    def message(self) -> str:
        where = (f"cell {self.cell} (0-based index in {self.notebook}.ipynb, In [{self.execution_count}])"
                 if self.cell is not None else "no cell (the kernel or papermill failed)")
        lines = [f"FAILED: notebook {self.notebook}.ipynb at {where}"]
        if self.source:
            lines.append(f"  cell starts: {self.source}")
        lines += [f"  {self.exception}",
                  f"  executed copy with the error: {self.executed_copy}",
                  f"  log: {self.log}"]
        return "\n".join(lines)


def _failure_from(exc: BaseException, stage: str, executed: Path, log: Path) -> Failure:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        cell = exc.cell_index
        try:  # papermill counts the cell it injected (`injected-parameters`); the source does not
            import nbformat

            nb = nbformat.read(executed, as_version=4)
            code_cells = [c for c in nb.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
            injected = sum(1 for c in code_cells[:exc.cell_index]
                           if "injected-parameters" in c.metadata.get("tags", []))
            cell = exc.cell_index - injected
        except Exception:  # noqa: BLE001 - fall back to papermill's index
            pass
        first = next((ln for ln in (exc.source or "").splitlines() if ln.strip()), "")
        return Failure(stage, cell, exc.exec_count, first.strip()[:120], f"{exc.ename}: {exc.evalue}",
                       str(executed), str(log))
    # the kernel died (out of memory, os._exit) or papermill failed: the last cell that started
    cell, count, first = _last_started_cell(executed)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Failure(stage, cell, count, first, f"{type(exc).__name__}: {message}", str(executed), str(log))


def _last_started_cell(executed: Path) -> tuple[int | None, int | None, str]:
    """`(source index, execution count, first line)` of the last cell papermill started in an
    executed copy, or Nones when unknown."""
    try:
        import nbformat

        nb = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001 - no readable copy: the place is unknown
        return None, None, ""
    found: tuple[int | None, int | None, str] = (None, None, "")
    index = -1
    for c in nb.cells:
        tags = c.metadata.get("tags", [])
        if "papermill-error-cell-tag" in tags or "injected-parameters" in tags:
            continue
        index += 1
        if c.cell_type == "code" and (c.metadata.get("papermill") or {}).get("start_time"):
            first = next((ln for ln in c.source.splitlines() if ln.strip()), "")
            found = (index, c.get("execution_count"), first.strip()[:120])
    return found


# --------------------------------------------------------------------------- run
@dataclass
class RunResult:
    """What `run_workbook` did: the run folder, `run_info.json`'s content, the failure if any."""

    dir: Path
    info: dict[str, Any]
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def run_workbook(name: str = "", profile: str = "default", params: dict[str, Any] | None = None,
                 force: bool = False, notebooks_dir: str | os.PathLike | None = None,
                 notebooks: Sequence[str] | None = None, kernel_name: str = KERNEL_NAME,
                 progress: bool = True, report: bool = True, command: Sequence[str] | None = None,
                 echo: Callable[[str], None] = print) -> RunResult:
    """Run the workbook's notebooks in order into one run folder.

    Args:
        name: run name under `runs/` or a path; empty means the profile's name.
        profile: a name in `hpelib.config.PROFILES`.
        params: `-p` pairs, values already parsed (`parse_value`): dotted keys are config
            overrides (checked before anything runs), others plain notebook parameters.
        force: re-run every notebook, ignoring the stage records.
        notebooks_dir: where the source notebooks are (default `paths.notebooks_dir()`, which
            honours `HPE_NOTEBOOKS_DIR`).
        notebooks: the stage names, in order (default `NOTEBOOKS`).
        report: write `report.md` after a successful run that produced `metrics.json`.

    Returns:
        A `RunResult`; `result.failure` says where a failed run stopped (nothing raised for a
        failing notebook).

    Raises:
        WorkbookError: a notebook file is missing, a plain parameter is declared by no notebook.
        ValueError: a bad profile or config override (the message names the key).
    """
    import papermill

    params = dict(params or {})
    overrides, plain = split_params(params)
    config = make_config(profile, overrides)  # fail here, before any notebook, on a bad override
    stages = list(notebooks or NOTEBOOKS)
    nb_dir = Path(notebooks_dir or paths.notebooks_dir())
    sources = {s: notebook_path(s, nb_dir) for s in stages}
    missing = [str(p) for p in sources.values() if not p.exists()]
    if missing:
        raise WorkbookError(f"notebooks not found: {', '.join(missing)}")

    # plain parameters go to the notebooks that declare them, and must be declared by one
    per_stage_plain: dict[str, dict[str, Any]] = {s: {} for s in stages}
    if plain:
        declared = {s: notebook_parameters(p, kernel_name) for s, p in sources.items()}
        for key, value in plain.items():
            takers = [s for s in stages if key in declared[s]]
            if not takers:
                known = sorted({k for d in declared.values() for k in d} - set(RUNNER_PARAMETERS))
                raise WorkbookError(f"-p {key}: no notebook declares a parameter {key!r}; declared: "
                                    f"{', '.join(known) or 'none'} (config overrides need a dotted key, e.g. lora.rank)")
            for s in takers:
                per_stage_plain[s][key] = value

    run_dir = paths.run_dir(name or profile)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / paths.NOTEBOOKS_DIR).mkdir(exist_ok=True)
    (run_dir / LOGS_DIR).mkdir(exist_ok=True)
    base_params = {"PROFILE": profile, "RUN_DIR": str(run_dir), "OVERRIDES": overrides}

    info: dict[str, Any] = {
        "name": run_dir.name, "run_dir": str(run_dir),
        "command": list(command) if command is not None else None,
        "profile": profile, "overrides": overrides, "notebook_parameters": plain,
        "parameters": {s: {**base_params, **per_stage_plain[s]} for s in stages},
        "seed": config.seed,
        "seeds": {k: v for k, v in _flatten(config.to_dict()).items() if k.split(".")[-1] in ("seed", "merge_seed")},
        "config_digest": config.digest(),
        "force": force, "git": git_info(), "versions": package_versions(),
        "platform": platform.platform(), "kernel": kernel_info(kernel_name),
        "notebooks_dir": str(nb_dir), "started": _now(), "finished": None, "duration_s": None,
        "status": "running", "failure": None,
        "notebooks": [{"name": s, "status": "pending"} for s in stages],
    }
    info_path = run_dir / paths.RUN_INFO
    io.write_json(info_path, info)
    t_run = time.monotonic()
    echo(f"run {run_dir} (profile {profile}{', overrides ' + json.dumps(overrides) if overrides else ''})")

    upstream: list[dict[str, str]] = []
    failure: Failure | None = None
    for i, stage in enumerate(stages):
        entry = info["notebooks"][i]
        executed = run_dir / paths.NOTEBOOKS_DIR / f"{stage}.ipynb"
        log = run_dir / LOGS_DIR / f"{stage}.log"
        inputs = stage_inputs(stage, sources[stage], config, per_stage_plain[stage], upstream)
        fp = fingerprint(inputs)
        reusable, why = (False, "--force") if force else reuse_decision(run_dir, stage, inputs)
        entry.update(output=str(executed), log=str(log), fingerprint=fp)
        if reusable:
            rec = io.read_json(stage_record_path(run_dir, stage))
            entry.update(status="reused", reason=why, run_id=rec["run_id"],
                         duration_s=rec.get("duration_s"), previous_finished=rec.get("finished"))
            upstream.append({"stage": stage, "run_id": rec["run_id"]})
            echo(f"[{i + 1}/{len(stages)}] {stage}: reused ({why})")
            io.write_json(info_path, info)
            continue

        stage_record_path(run_dir, stage).unlink(missing_ok=True)  # a record only for a completed copy
        echo(f"[{i + 1}/{len(stages)}] {stage}: running ({why})")
        entry.update(status="running", reason=why, started=_now())
        io.write_json(info_path, info)
        t0 = time.monotonic()
        with open(log, "w", encoding="utf-8") as log_file:
            log_file.write(f"# {stage} started {entry['started']}; parameters "
                           f"{json.dumps(info['parameters'][stage], default=str)}\n")
            log_file.flush()
            try:
                papermill.execute_notebook(
                    str(sources[stage]), str(executed), parameters=info["parameters"][stage],
                    kernel_name=kernel_name, progress_bar=progress, cwd=str(sources[stage].parent),
                    stdout_file=log_file, stderr_file=log_file)
            except KeyboardInterrupt:
                entry.update(status="interrupted", finished=_now())
                info.update(status="interrupted", finished=_now())
                io.write_json(info_path, info)
                raise
            except Exception as exc:  # noqa: BLE001 - any failure stops the run with its place
                failure = _failure_from(exc, stage, executed, log)
                log_file.write(f"\n# FAILED\n{failure.message()}\n")
        duration = round(time.monotonic() - t0, 2)
        entry.update(finished=_now(), duration_s=duration)
        if failure is not None:
            entry["status"] = "failed"
            break
        run_id = write_stage_record(run_dir, stage, inputs, started=entry["started"],
                                    finished=entry["finished"], duration_s=duration)
        entry.update(status="ran", run_id=run_id)
        upstream.append({"stage": stage, "run_id": run_id})
        echo(f"[{i + 1}/{len(stages)}] {stage}: done in {duration:.1f} s")
        io.write_json(info_path, info)

    for entry in info["notebooks"]:
        if entry["status"] == "pending":
            entry["status"] = "not run"
    info.update(finished=_now(), duration_s=round(time.monotonic() - t_run, 2),
                status="failed" if failure else "ok",
                failure=None if failure is None else failure.__dict__)
    io.write_json(info_path, info)
    if failure is not None:
        echo(failure.message())
    elif report and (run_dir / paths.METRICS).exists():
        try:
            from hpelib.report import write_report

            echo(f"report: {write_report(run_dir)}")
        except Exception as e:  # noqa: BLE001 - the run itself succeeded; say why the report did not
            echo(f"warning: report.md not written ({type(e).__name__}: {e})")
    return RunResult(run_dir, info, failure)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("adapters",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_run_info(run: str | os.PathLike) -> dict[str, Any]:
    return io.read_json(paths.run_dir(run) / paths.RUN_INFO)


# --------------------------------------------------------------------------- compare
def compare_runs(names: Sequence[str], metrics: Sequence[str] | None = COMPARE_METRICS) -> "pd.DataFrame":
    """Side-by-side metrics of several runs.

    Args:
        names: run names (under `runs/`) or paths.
        metrics: metric names to keep (the last part of `<variant>/<domain>/<metric>`); None keeps
            every key of the runs' `metrics.json`.

    Returns:
        DataFrame indexed by metric key (sorted by variant, domain, metric order), one column per run.
    """
    import pandas as pd

    from hpelib.evaluate import variant_sort_key

    columns = {}
    for name in names:
        path = paths.run_dir(name) / paths.METRICS
        if not path.exists():
            raise WorkbookError(f"{path} not found: run {name!r} has no metrics (did it finish?)")
        m = io.read_json(path)
        columns[Path(name).name] = {k: v for k, v in m.items()
                                    if metrics is None or k.split("/")[-1] in metrics}
    df = pd.DataFrame(columns)

    order = {m: i for i, m in enumerate(metrics or ())}

    def key(k: str) -> tuple:
        parts = k.split("/")
        if len(parts) != 3:
            return ((-1,), "", 0, k)
        return (variant_sort_key(parts[0]), parts[1], order.get(parts[2], len(order)), parts[2])

    df = df.loc[sorted(df.index, key=key)] if len(df) else df
    df.index.name = "metric"
    return df


def markdown_table(df: "pd.DataFrame", floatfmt: str = ".3g") -> str:
    """A GitHub markdown table of a DataFrame (index as the first column), without extra deps."""
    import pandas as pd

    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "–"
        if isinstance(v, float):
            return format(v, floatfmt)
        return str(v).replace("|", "\\|")

    index_name = " / ".join(str(n) for n in df.index.names if n) or ""
    if isinstance(df.columns, pd.MultiIndex):
        headers = [" ".join(str(x) for x in c) for c in df.columns]
    else:
        headers = [str(c) for c in df.columns]
    lines = ["| " + " | ".join([index_name] + headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(headers)) + "|"]
    for idx, row in df.iterrows():
        label = " / ".join(map(str, idx)) if isinstance(idx, tuple) else str(idx)
        lines.append("| " + " | ".join([fmt(label)] + [fmt(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def _compare_stem(names: Sequence[str]) -> str:
    from hpelib.evaluate import safe_name

    stem = "compare-" + "+".join(safe_name(Path(n).name) for n in names)
    if len(stem) > 120:  # long sweeps: keep the file name short and unique
        stem = stem[:100] + "-" + hashlib.sha256(stem.encode()).hexdigest()[:8]
    return stem


def save_comparison(df: "pd.DataFrame", names: Sequence[str], out_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write `runs/compare-<names>.csv` and `.md`; returns both paths."""
    out_dir = Path(out_dir or paths.runs_dir())
    stem = _compare_stem(names)
    csv = out_dir / f"{stem}.csv"
    with io.atomic_path(csv) as tmp:
        df.to_csv(tmp)
    md = io.write_text(out_dir / f"{stem}.md", f"# {', '.join(Path(n).name for n in names)}\n\n" + markdown_table(df))
    return csv, md


# --------------------------------------------------------------------------- sweep
def split_values(text: str) -> list[str]:
    """Split `V1,V2,...` at the commas outside brackets and quotes: `"[0.9,0.99],[0.999]"` gives
    two values."""
    out, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    out.append("".join(cur).strip())
    return [v for v in out if v != ""]


def sweep_run_name(prefix: str, key: str, value_text: str) -> str:
    from hpelib.evaluate import safe_name

    return f"{prefix}-{key}={safe_name(value_text)}"


def sweep(profile: str, raw_params: Sequence[tuple[str, str]], prefix: str = "sweep", force: bool = False,
          notebooks_dir: str | os.PathLike | None = None, notebooks: Sequence[str] | None = None,
          kernel_name: str = KERNEL_NAME, progress: bool = True,
          metrics: Sequence[str] = COMPARE_METRICS, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One workbook run per value of the one swept `-p KEY V1,V2,...`; then the comparison.

    Args:
        raw_params: `-p` pairs as typed; exactly one has several comma-separated values (the
            swept key); the others hold for every run.
        prefix: runs are named `<prefix>-<KEY>=<value>` under `runs/`.

    Returns:
        `{"key", "values", "runs", "failed", "table", "csv", "md", "figure"}`.
    """
    split = {k: split_values(v) for k, v in raw_params}
    swept = [k for k, vs in split.items() if len(vs) > 1]
    if len(swept) != 1:
        raise WorkbookError("sweep needs exactly one -p KEY V1,V2,... with several values; got "
                            + (", ".join(swept) if swept else "none"))
    key = swept[0]
    fixed = {k: parse_value(v) for k, v in raw_params if k != key}
    runs, failed = [], []
    for text in split[key]:
        name = sweep_run_name(prefix, key, text)
        echo(f"=== sweep {key}={text} -> runs/{name}")
        result = run_workbook(name, profile, {**fixed, key: parse_value(text)}, force=force,
                              notebooks_dir=notebooks_dir, notebooks=notebooks, kernel_name=kernel_name,
                              progress=progress, echo=echo)
        (runs if result.ok else failed).append(name)
    out: dict[str, Any] = {"key": key, "values": split[key], "runs": runs, "failed": failed,
                           "table": None, "csv": None, "md": None, "figure": None}
    done = [n for n in runs if (paths.run_dir(n) / paths.METRICS).exists()]
    if done:
        table = compare_runs(done, metrics)
        out["table"] = table
        out["csv"], out["md"] = save_comparison(table, done)
        echo(markdown_table(table))
        labels = [t for t in split[key] if sweep_run_name(prefix, key, t) in done]
        values = [parse_value(t) for t in labels]
        fig = sweep_figure(table, key, values, labels, SWEEP_FIGURE_METRICS)
        if fig is not None:
            from hpelib.evaluate import safe_name
            from hpelib.plots import save_figure

            out["figure"] = save_figure(fig, paths.runs_dir() / f"sweep-{safe_name(prefix)}-{safe_name(key)}.png")
            echo(f"figure: {out['figure']}")
    return out


def sweep_figure(table: "pd.DataFrame", key: str, values: Sequence[Any], labels: Sequence[str],
                 metrics: Sequence[str] = SWEEP_FIGURE_METRICS):
    """Main metrics against the swept value: one panel per (metric, domain), one line per variant.

    Args:
        table: `compare_runs` output, its columns in the order of `values`.
    Returns:
        A matplotlib Figure, or None when the table holds none of `metrics`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [k.split("/") for k in table.index if len(k.split("/")) == 3 and k.split("/")[2] in metrics]
    if not rows:
        return None
    domains = list(dict.fromkeys(r[1] for r in rows))
    mets = [m for m in metrics if any(r[2] == m for r in rows)]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = list(values) if numeric else list(range(len(values)))
    fig, axes = plt.subplots(len(mets), len(domains), figsize=(4.2 * len(domains), 3.2 * len(mets)),
                             squeeze=False, sharex=True)
    for i, m in enumerate(mets):
        for j, d in enumerate(domains):
            ax = axes[i][j]
            for var in dict.fromkeys(r[0] for r in rows if r[1] == d and r[2] == m):
                ys = table.loc[f"{var}/{d}/{m}"].to_numpy(dtype=float)
                ax.plot(x, ys, marker="o", label=var)
            ax.set_title(f"{d}: {m}", fontsize=9)
            if i == len(mets) - 1:
                ax.set_xlabel(key)
            if not numeric:
                ax.set_xticks(x, labels, rotation=30, fontsize=8)
            ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"metrics vs {key}")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- CLI
def _build_parser() -> argparse.ArgumentParser:
    from hpelib.config import PROFILES

    p = argparse.ArgumentParser(
        prog="python -m hpelib.workbook",
        description="Run the HPE workbook notebooks with papermill as one run folder under runs/, "
                    "compare runs, sweep a parameter.",
        epilog="Examples:\n"
               "  python -m hpelib.workbook run --profile default\n"
               "  python -m hpelib.workbook run --profile smoke --name try1 -p lora.rank 16 "
               "-p merge.wta_thresholds \"[0.999]\"\n"
               "  python -m hpelib.workbook compare default try1\n"
               "  python -m hpelib.workbook sweep --profile default -p lora.adapters.hpe_rehearsal 0.0,0.2,0.5\n"
               "  python -m hpelib.workbook params\n\n"
               "Stage reuse: a notebook whose file, parameters, config sections and upstream stages are\n"
               "unchanged since its last completed execution in the same run folder is skipped (its\n"
               "executed copy kept); --force re-runs all. See `pydoc hpelib.workbook`.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare,sweep,params}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", default="default", choices=sorted(PROFILES),
                        help="configuration profile (hpelib.config.PROFILES; default: %(default)s)")
        sp.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="a dotted KEY is a config override (-p lora.rank 16); a KEY without a dot "
                             "is a parameter of the notebooks that declare it. VALUE is JSON/YAML "
                             "(16, 0.5, true, \"[0.999]\") or text. Repeatable.")
        sp.add_argument("--force", action="store_true", help="re-run every notebook, reusing none")
        sp.add_argument("--notebooks-dir", default=None,
                        help="folder of the source notebooks (default: notebooks/, or $HPE_NOTEBOOKS_DIR)")
        sp.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel name (default: %(default)s)")
        sp.add_argument("--no-progress", action="store_true", help="no per-cell progress bars")

    r = sub.add_parser("run", help="run the six notebooks in order into runs/NAME/",
                       description="Run the six notebooks in order into runs/NAME/ (executed notebooks, "
                                   "logs/, run_info.json, metrics.json, report.md). Stops at the first "
                                   "failing notebook and names the cell.")
    common(r)
    r.add_argument("--name", default="", help="run name under runs/ or a path (default: the profile name)")

    c = sub.add_parser("compare", help="side-by-side metrics of several runs",
                       description="Print and save runs/compare-<names>.csv/.md: chosen metrics of several runs.")
    c.add_argument("names", nargs="+", help="run names under runs/ (or paths)")
    c.add_argument("--metrics", default=",".join(COMPARE_METRICS),
                   help="comma-separated metric names (default: %(default)s)")
    c.add_argument("--all", action="store_true", help="every key of metrics.json")

    s = sub.add_parser("sweep", help="one run per value of -p KEY V1,V2,...",
                       description="Run one workbook per value of the swept parameter (the one -p with "
                                   "several comma-separated values; runs named PREFIX-KEY=VALUE), then "
                                   "save the comparison table and a figure of the main metrics against "
                                   "the value. Other -p pairs hold for every run.")
    common(s)
    s.add_argument("--name", default="sweep", help="run-name prefix (default: %(default)s)")
    s.add_argument("--metrics", default=",".join(COMPARE_METRICS),
                   help="comma-separated metric names of the table (default: %(default)s)")

    q = sub.add_parser("params", help="each notebook's parameters (papermill inspection)")
    q.add_argument("--notebooks-dir", default=None, help="folder of the source notebooks")
    q.add_argument("--kernel", default=KERNEL_NAME, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0 ok, 1 a notebook failed, 2 a usage error)."""
    args = _build_parser().parse_args(argv)
    command = ["python", "-m", "hpelib.workbook", *(sys.argv[1:] if argv is None else argv)]
    try:
        if args.command == "run":
            params = {k: parse_value(v) for k, v in args.param}
            result = run_workbook(args.name, args.profile, params, force=args.force,
                                  notebooks_dir=args.notebooks_dir, kernel_name=args.kernel,
                                  progress=not args.no_progress, command=command)
            if not result.ok:
                return 1
            print(f"ok: {result.dir}")
            return 0
        if args.command == "compare":
            metrics = None if args.all else [m.strip() for m in args.metrics.split(",") if m.strip()]
            table = compare_runs(args.names, metrics)
            print(markdown_table(table), end="")
            csv, md = save_comparison(table, args.names)
            print(f"saved: {csv}, {md}")
            return 0
        if args.command == "sweep":
            metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
            out = sweep(args.profile, [tuple(p) for p in args.param], prefix=args.name, force=args.force,
                        notebooks_dir=args.notebooks_dir, kernel_name=args.kernel,
                        progress=not args.no_progress, metrics=metrics)
            if out["csv"]:
                print(f"saved: {out['csv']}, {out['md']}" + (f", {out['figure']}" if out["figure"] else ""))
            if out["failed"]:
                print(f"failed runs: {', '.join(out['failed'])}", file=sys.stderr)
                return 1
            return 0
        if args.command == "params":
            nb_dir = Path(args.notebooks_dir or paths.notebooks_dir())
            for stage in NOTEBOOKS:
                path = notebook_path(stage, nb_dir)
                print(f"{stage}.ipynb")
                if not path.exists():
                    print("  (missing)")
                    continue
                for p in notebook_parameters(path, args.kernel).values():
                    print(f"  {p['name']}: {p['inferred_type_name']} = {p['default']}"
                          + (f"  # {p['help']}" if p.get("help") else ""))
            return 0
    except (WorkbookError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
