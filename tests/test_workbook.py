"""The papermill runner (hpelib.workbook) on small dummy notebooks, and the report (hpelib.report).

The dummy notebooks live in tmp_path (`HPE_NOTEBOOKS_DIR`) and really run through papermill on the
`python3` kernel, i.e. the interpreter running the tests (see hpelib.workbook's docstring). Each
execution costs a kernel start (~2 s), so every test runs as few notebooks as it can:
`workbook.NOTEBOOKS` is narrowed with monkeypatch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

from hpelib import io, paths, report, workbook

RUNNER_PARAMS = '''PROFILE: str = "default"  # configuration profile
RUN_DIR: str = ""  # the run folder
OVERRIDES: dict = {}  # dotted config overrides
'''

RECORD = '''import json, os, sys
from hpelib.workbook import open_run
run = open_run(RUN_DIR, PROFILE, OVERRIDES)
with open(os.path.join(RUN_DIR, "order.txt"), "a") as f:
    f.write(json.dumps({"stage": STAGE, "PROFILE": PROFILE, "RUN_DIR": RUN_DIR, "OVERRIDES": OVERRIDES,
                        "python": sys.executable, "extra": EXTRA}) + "\\n")
print("hello from", STAGE)
'''

METRICS = '''run.save_metrics(STAGE, {
    "base/synth-aflw/mae_mean": 30.0,
    "base/synth-aflw/valid_rate": 0.5,
    "wta_cosine@0.9999/synth-aflw/mae_mean": 10.0 + run.config.lora.rank,
    "wta_cosine@0.9999/synth-aflw/valid_rate": 1.0,
    "wta_cosine@0.9999/synth-aflw/grounding_acc50": 0.75,
})
'''


def make_notebook(folder: Path, stage: str, extra_params: str = "", body: str = "", fail: bool = False,
                  metrics: bool = False) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    params = nbformat.v4.new_code_cell(RUNNER_PARAMS + extra_params)
    params.metadata["tags"] = ["parameters"]
    extra_names = [ln.split(":")[0].strip() for ln in extra_params.splitlines() if ln.strip()]
    cells = [nbformat.v4.new_markdown_cell(f"# {stage}"), params,
             nbformat.v4.new_code_cell(f"STAGE = {stage!r}\nEXTRA = {{{', '.join(f'{n!r}: {n}' for n in extra_names)}}}"),
             nbformat.v4.new_code_cell(RECORD)]
    if body:
        cells.append(nbformat.v4.new_code_cell(body))
    if fail:
        cells.append(nbformat.v4.new_code_cell("x = 1\nraise ValueError('boom in ' + STAGE)"))
    if metrics:
        cells.append(nbformat.v4.new_code_cell(METRICS))
    nb.cells = cells
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch, run_root):
    """Temporary notebooks/ and runs/ folders; returns the notebooks folder."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    monkeypatch.setenv("HPE_NOTEBOOKS_DIR", str(nb_dir))
    monkeypatch.setenv("HPE_DATA_DIR", str(tmp_path / "data"))
    return nb_dir


def order(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "order.txt").read_text().splitlines()]


def statuses(run_dir: Path) -> dict[str, str]:
    return {n["name"]: n["status"] for n in io.read_json(run_dir / paths.RUN_INFO)["notebooks"]}


# --------------------------------------------------------------------------- parameters
def test_parse_value_and_split_values():
    assert workbook.parse_value("16") == 16
    assert workbook.parse_value("1e-4") == pytest.approx(1e-4)
    assert workbook.parse_value("[0.999]") == [0.999]
    assert workbook.parse_value("true") is True
    assert workbook.parse_value("null") is None
    assert workbook.parse_value("{hpe: 0.1}") == {"hpe": 0.1}  # YAML
    assert workbook.parse_value("abc") == "abc"
    assert workbook.parse_value("2024-01-01") == "2024-01-01"  # a YAML date stays text
    assert workbook.split_values("1,2, 3") == ["1", "2", "3"]
    assert workbook.split_values("[0.9,0.99],[0.999]") == ["[0.9,0.99]", "[0.999]"]
    assert workbook.split_params({"lora.rank": 16, "N_SHOW": 2}) == ({"lora.rank": 16}, {"N_SHOW": 2})
    with pytest.raises(workbook.WorkbookError, match="RUN_DIR"):
        workbook.split_params({"RUN_DIR": "x"})


def test_notebook_list_is_the_six_stages_in_order():
    assert workbook.NOTEBOOKS == ("00_prepare_data", "01_train_base", "02_train_lora",
                                  "03_layer_similarity", "04_merge", "05_evaluate")
    assert set(workbook.STAGE_CONFIG_SECTIONS) == set(workbook.NOTEBOOKS)


def test_kernel_is_this_interpreter():
    info = workbook.kernel_info("python3")
    assert info["python"] == sys.executable, info  # else register: python -m ipykernel install --sys-prefix


# --------------------------------------------------------------------------- run
def test_run_order_parameters_info_logs_and_reuse(env, run_root, monkeypatch, capsys):
    stages = ("02_train_lora", "05_evaluate")
    monkeypatch.setattr(workbook, "NOTEBOOKS", stages)
    make_notebook(env, "02_train_lora", extra_params="N_SHOW: int = 3  # examples shown\n")
    make_notebook(env, "05_evaluate", metrics=True)
    argv = ["run", "--profile", "smoke", "--name", "r1", "--no-progress",
            "-p", "lora.rank", "16", "-p", "merge.wta_thresholds", "[0.999]", "-p", "N_SHOW", "5"]

    assert workbook.main(argv) == 0
    run_dir = run_root / "r1"
    rows = order(run_dir)
    assert [r["stage"] for r in rows] == list(stages)
    for r in rows:
        assert r["PROFILE"] == "smoke" and r["RUN_DIR"] == str(run_dir) and Path(r["RUN_DIR"]).is_absolute()
        assert r["OVERRIDES"] == {"lora.rank": 16, "merge.wta_thresholds": [0.999]}
        assert r["python"] == sys.executable  # the kernel runs this interpreter
    assert rows[0]["extra"] == {"N_SHOW": 5}
    # the plain parameter went only to the notebook that declares it
    injected = {s: nbformat.read(run_dir / "notebooks" / f"{s}.ipynb", 4).metadata.papermill.parameters
                for s in stages}
    assert injected["02_train_lora"]["N_SHOW"] == 5 and "N_SHOW" not in injected["05_evaluate"]

    info = io.read_json(run_dir / paths.RUN_INFO)
    assert info["status"] == "ok" and info["profile"] == "smoke"
    assert info["overrides"] == {"lora.rank": 16, "merge.wta_thresholds": [0.999]}
    assert info["notebook_parameters"] == {"N_SHOW": 5}
    assert info["seed"] == 0 and "data.seed" in info["seeds"]
    assert set(info["versions"]) >= {"python", "torch", "transformers", "peft", "papermill"}
    assert set(info["git"]) == {"commit", "dirty"}
    assert info["command"][:4] == ["python", "-m", "hpelib.workbook", "run"]
    assert info["started"] <= info["finished"]
    assert [n["status"] for n in info["notebooks"]] == ["ran"] * 2
    assert all(n["duration_s"] > 0 for n in info["notebooks"])
    assert "hello from 02_train_lora" in (run_dir / "logs" / "02_train_lora.log").read_text()
    assert (run_dir / paths.METRICS).exists() and (run_dir / paths.REPORT).exists()
    assert (run_dir / "notebooks" / "05_evaluate.stage.json").exists()

    # the same command again: every stage reused, nothing executed
    assert workbook.main(argv) == 0
    assert len(order(run_dir)) == 2
    assert set(statuses(run_dir).values()) == {"reused"}

    # an eval override only re-runs the evaluation stage
    assert workbook.main(argv + ["-p", "eval.batch_size", "4"]) == 0
    assert [r["stage"] for r in order(run_dir)[2:]] == ["05_evaluate"]
    assert statuses(run_dir) == {"02_train_lora": "reused", "05_evaluate": "ran"}
    reasons = {n["name"]: n.get("reason") for n in io.read_json(run_dir / paths.RUN_INFO)["notebooks"]}
    assert reasons["05_evaluate"] == "config changed (eval)"


def test_reuse_rule(tmp_path):
    """The rule on hand-made stage records, without executing anything."""
    from hpelib.config import make_config

    run_dir = tmp_path / "r"
    nb = make_notebook(tmp_path / "src", "04_merge")
    (run_dir / "notebooks").mkdir(parents=True)
    (run_dir / "notebooks" / "04_merge.ipynb").write_text("executed")
    cfg = make_config("smoke")
    up = [{"stage": "03_layer_similarity", "run_id": "aaa"}]

    def inputs(config=cfg, params=None, upstream=up):
        return workbook.stage_inputs("04_merge", nb, config, params or {}, upstream)

    assert workbook.reuse_decision(run_dir, "04_merge", inputs()) == (False, "not run before")
    workbook.write_stage_record(run_dir, "04_merge", inputs())
    assert workbook.reuse_decision(run_dir, "04_merge", inputs())[0]
    # a setting of another stage's section does not matter; its own section's does
    assert workbook.reuse_decision(run_dir, "04_merge", inputs(make_config("smoke", {"eval.batch_size": 2})))[0]
    assert workbook.reuse_decision(run_dir, "04_merge", inputs(make_config("smoke", {"merge.ties_density": 0.5}))) \
        == (False, "config changed (merge)")
    assert workbook.reuse_decision(run_dir, "04_merge", inputs(params={"N": 1})) == (False, "parameters changed")
    assert workbook.reuse_decision(run_dir, "04_merge", inputs(upstream=[{"stage": "03_layer_similarity",
                                                                           "run_id": "bbb"}])) \
        == (False, "an upstream stage ran again")
    make_notebook(tmp_path / "src", "04_merge", body="print(1)")
    assert workbook.reuse_decision(run_dir, "04_merge", inputs()) == (False, "notebook changed")
    workbook.write_stage_record(run_dir, "04_merge", inputs())
    (run_dir / "notebooks" / "04_merge.ipynb").write_text("edited by hand")
    assert workbook.reuse_decision(run_dir, "04_merge", inputs()) == (False, "executed copy missing or changed")


def test_sections_no_stage_lists_go_to_the_first_stage(monkeypatch):
    from hpelib.config import make_config

    cfg = make_config("smoke")
    assert workbook.stage_sections("05_evaluate", cfg) == ("eval",)
    assert set(workbook.stage_sections("00_prepare_data", cfg)) == {"seed", "angle_decimals", "data", "model"}
    monkeypatch.setitem(workbook.STAGE_CONFIG_SECTIONS, "05_evaluate", ())
    assert "eval" in workbook.stage_sections("00_prepare_data", cfg)
    assert workbook.stage_sections("99_extra", cfg) == ()  # unknown stage: the whole config


def test_force_reruns_everything(env, run_root, monkeypatch):
    monkeypatch.setattr(workbook, "NOTEBOOKS", ("05_evaluate",))
    make_notebook(env, "05_evaluate")
    first = workbook.run_workbook("f", "smoke", progress=False, echo=lambda s: None)
    again = workbook.run_workbook("f", "smoke", force=True, progress=False, echo=lambda s: None)
    assert first.ok and again.ok
    assert [n["status"] for n in again.info["notebooks"]] == ["ran"]
    assert again.info["notebooks"][0]["reason"] == "--force"
    assert again.info["notebooks"][0]["run_id"] != first.info["notebooks"][0]["run_id"]
    assert len(order(run_root / "f")) == 2


def test_stops_at_failing_notebook_and_names_the_cell(env, run_root, monkeypatch, capsys):
    stages = ("01_train_base", "02_train_lora")
    monkeypatch.setattr(workbook, "NOTEBOOKS", stages)
    for s in stages:
        make_notebook(env, s, fail=(s == "01_train_base"))
    assert workbook.main(["run", "--profile", "smoke", "--name", "bad", "--no-progress"]) == 1
    out = capsys.readouterr().out
    run_dir = run_root / "bad"
    # source cells: markdown, parameters, STAGE, RECORD, the failing one (index 4)
    assert "FAILED: notebook 01_train_base.ipynb at cell 4 " in out
    assert "cell starts: x = 1" in out and "ValueError: boom in 01_train_base" in out
    assert [r["stage"] for r in order(run_dir)] == ["01_train_base"]
    executed = nbformat.read(run_dir / "notebooks" / "01_train_base.ipynb", 4)
    assert any(o.get("ename") == "ValueError" for c in executed.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
    assert not (run_dir / "notebooks" / "01_train_base.stage.json").exists()
    assert not (run_dir / "notebooks" / "02_train_lora.ipynb").exists()
    info = io.read_json(run_dir / paths.RUN_INFO)
    assert info["status"] == "failed"
    assert statuses(run_dir) == {"01_train_base": "failed", "02_train_lora": "not run"}
    assert info["failure"]["notebook"] == "01_train_base" and info["failure"]["cell"] == 4
    assert "boom" in (run_dir / "logs" / "01_train_base.log").read_text()


def test_kernel_death_names_the_last_started_cell(env, run_root, monkeypatch):
    """A kernel killed mid-cell (out of memory, os._exit) is reported at that cell too."""
    monkeypatch.setattr(workbook, "NOTEBOOKS", ("01_train_base",))
    make_notebook(env, "01_train_base", body="import os\nos._exit(3)")
    messages = []
    result = workbook.run_workbook("dead", "smoke", progress=False, echo=messages.append)
    assert not result.ok
    assert result.failure.cell == 4 and result.failure.source == "import os"
    assert "DeadKernelError" in result.failure.exception
    assert "FAILED: notebook 01_train_base.ipynb at cell 4 " in messages[-1]
    assert result.info["status"] == "failed"


def test_usage_errors_before_anything_runs(env, run_root, monkeypatch, capsys):
    monkeypatch.setattr(workbook, "NOTEBOOKS", ("00_prepare_data",))
    make_notebook(env, "00_prepare_data")
    assert workbook.main(["run", "--profile", "smoke", "--name", "u", "-p", "NOPE", "1"]) == 2
    assert "no notebook declares a parameter 'NOPE'" in capsys.readouterr().err
    assert workbook.main(["run", "--profile", "smoke", "--name", "u", "-p", "lora.rank", "-3"]) == 2
    assert "lora.rank" in capsys.readouterr().err
    assert workbook.main(["run", "--profile", "smoke", "--name", "u", "-p", "lora.nope", "1"]) == 2
    monkeypatch.setattr(workbook, "NOTEBOOKS", ("00_prepare_data", "09_missing"))
    assert workbook.main(["run", "--profile", "smoke", "--name", "u"]) == 2
    assert "09_missing.ipynb" in capsys.readouterr().err
    assert not (run_root / "u").exists()


def test_params_lists_each_notebooks_parameters(env, capsys):
    make_notebook(env, "02_train_lora", extra_params="N_SHOW: int = 3  # examples shown\n")
    assert workbook.main(["params"]) == 0
    out = capsys.readouterr().out
    assert "02_train_lora.ipynb" in out and "N_SHOW: int = 3  # examples shown" in out
    assert "00_prepare_data.ipynb\n  (missing)" in out


@pytest.mark.parametrize("notebook", workbook.NOTEBOOKS)
def test_papermill_lists_every_parameter_of_the_shipped_notebooks_with_type_and_help(notebook):
    """`papermill --help-notebook` infers a parameter only from annotations its pattern reads (not
    `int | None`): every assignment of the parameters cell must come out with a type and its help."""
    import ast

    import papermill

    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{notebook}.ipynb"
    cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    assigned = [node.target.id for node in ast.parse(cell.source).body if isinstance(node, ast.AnnAssign)]
    inferred = papermill.inspect_notebook(str(path))
    assert list(inferred) == assigned, f"{path.name}: papermill does not see {sorted(set(assigned) - set(inferred))}"
    for name, info in inferred.items():
        assert info["inferred_type_name"] not in ("None", "") and info["help"].strip(), (path.name, name, info)


@pytest.mark.parametrize("notebook", workbook.NOTEBOOKS)
def test_every_cell_of_the_shipped_notebooks_has_an_id(notebook):
    """nbformat 4.5 cells carry an `id`; one added by hand without it makes every run warn
    (MissingIDFieldWarning, a hard error in future nbformat versions)."""
    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{notebook}.ipynb"
    raw = json.loads(path.read_text())
    assert (raw["nbformat"], raw["nbformat_minor"]) >= (4, 5), path.name
    missing = [i for i, cell in enumerate(raw["cells"]) if not cell.get("id")]
    assert not missing, f"{path.name}: cells {missing} have no id"
    ids = [cell["id"] for cell in raw["cells"]]
    assert len(set(ids)) == len(ids), f"{path.name}: repeated cell ids"


# A valid value, unlike every profile's, for each config key a notebook sets by a named parameter
NAMED_KEY_VALUES = {
    "data.image_size": 80, "data.n_train": 11, "data.n_test": 7, "data.test_domains": ["synth-aflw"], "data.seed": 3,
    "data.root_300wlp": "/x/300W_LP", "data.root_aflw2000": "/x/AFLW2000", "data.biwi_npz": "/x/biwi.npz",
    "base.max_steps": 7, "base.minutes": 2.5, "lora.rank": 4, "lora.train.minutes": 3.0,
    "lora.adapters": {"solo": 0.1}, "merge.wta_thresholds": [0.5], "merge.ta_lambdas": [0.3],
    "merge.methods": ["ties"], "eval.n_samples": 5, "eval.batch_size": 3,
}


def _open_run_of(notebook: str, run_dir: Path, **params):
    """Run a shipped notebook's imports, its parameters cell (then `params`, as papermill injects
    them) and the `run = open_run(...)` statement; return that statement's `run` and the keys the
    notebook's named parameters set (key -> parameter name)."""
    import ast

    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{notebook}.ipynb"
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    i = next(i for i, c in enumerate(cells) if "open_run(" in c.source)
    statement = ast.parse(cells[i].source).body[0]
    call = statement.value
    named = {k.value: getattr(v, "id", None) for k, v in zip(call.args[3].keys, call.args[3].values)} \
        if len(call.args) > 3 else {}
    ns: dict = {}
    for cell in cells[:i]:
        exec(cell.source, ns)
    ns.update(RUN_DIR=str(run_dir), PROFILE="smoke", **params)
    exec(compile(ast.Module([statement], []), path.name, "exec"), ns)
    return ns["run"], named


@pytest.mark.parametrize("notebook", workbook.NOTEBOOKS)
def test_runner_overrides_reach_every_notebook_whatever_its_named_parameters(notebook, run_root):
    """`-p lora.rank 4` reaches the run's config in every notebook: a notebook's named parameter
    left unset (None) does not put the profile's value back (it did, in 00/01/02/04/05, until the
    eleventh session), and one that is set wins over the same key in OVERRIDES."""
    from hpelib.config import make_config

    smoke = make_config("smoke").to_dict()
    run, named = _open_run_of(notebook, run_root / f"o-{notebook}", OVERRIDES=dict(NAMED_KEY_VALUES))
    flat = run.config.to_dict()
    for key, value in NAMED_KEY_VALUES.items():
        got, default = flat, smoke
        for part in key.split("."):
            got, default = got[part], default[part]
        assert got == value != default, (notebook, key, got)
    assert set(named) <= set(NAMED_KEY_VALUES), f"{notebook}: give the table a value for {set(named) - set(NAMED_KEY_VALUES)}"
    if not named:
        return
    first_key, first_name = next(iter(named.items()))
    value = {"data.image_size": 96, "base.max_steps": 9, "lora.rank": 2, "merge.wta_thresholds": [0.7],
             "eval.n_samples": 6}[first_key]
    run, _ = _open_run_of(notebook, run_root / f"p-{notebook}", OVERRIDES=dict(NAMED_KEY_VALUES), **{first_name: value})
    got = run.config.to_dict()
    for part in first_key.split("."):
        got = got[part]
    assert got == value, (notebook, first_name, got)


# --------------------------------------------------------------------------- compare and sweep
def fake_run(name: str, metrics: dict, **info) -> Path:
    d = paths.run_dir(name)
    io.write_json(d / paths.METRICS, metrics)
    io.write_json(d / paths.RUN_INFO, {"profile": "default", "finished": "2026-01-02T03:04:05+00:00",
                                       "git": {"commit": "0123456789abcdef", "dirty": False}, **info})
    return d


def test_compare_prints_and_saves(run_root, capsys):
    fake_run("a", {"base/d/mae_mean": 20.0, "base/d/valid_rate": 0.5, "wta_cosine@0.999/d/mae_mean": 8.0,
                   "base/d/n": 3})
    fake_run("b", {"base/d/mae_mean": 18.0, "wta_cosine@0.999/d/mae_mean": 7.0})
    assert workbook.main(["compare", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "| base/d/mae_mean | 20 | 18 |" in out
    table = workbook.compare_runs(["a", "b"])
    assert list(table.columns) == ["a", "b"]
    assert list(table.index) == ["base/d/mae_mean", "base/d/valid_rate", "wta_cosine@0.999/d/mae_mean"]
    assert (run_root / "compare-a+b.csv").exists() and (run_root / "compare-a+b.md").exists()
    assert "base/d/n" in workbook.compare_runs(["a", "b"], metrics=None).index
    assert workbook.main(["compare", "a", "missing"]) == 2


def test_sweep_runs_one_workbook_per_value(env, run_root, monkeypatch):
    monkeypatch.setattr(workbook, "NOTEBOOKS", ("05_evaluate",))
    make_notebook(env, "05_evaluate", metrics=True)
    code = workbook.main(["sweep", "--profile", "smoke", "--name", "sw", "--no-progress",
                          "-p", "lora.rank", "4,8", "-p", "eval.batch_size", "2"])
    assert code == 0
    for rank in (4, 8):
        rows = order(run_root / f"sw-lora.rank={rank}")
        assert rows[0]["OVERRIDES"] == {"lora.rank": rank, "eval.batch_size": 2}
    table = workbook.compare_runs(["sw-lora.rank=4", "sw-lora.rank=8"])
    assert table.loc["wta_cosine@0.9999/synth-aflw/mae_mean"].tolist() == [14.0, 18.0]
    assert (run_root / "compare-sw-lora.rank=4+sw-lora.rank=8.csv").exists()
    assert (run_root / "sweep-sw-lora.rank.png").stat().st_size > 0


def test_sweep_needs_one_multi_valued_key(env):
    with pytest.raises(workbook.WorkbookError, match="exactly one"):
        workbook.sweep("smoke", [("lora.rank", "4")])
    with pytest.raises(workbook.WorkbookError, match="exactly one"):
        workbook.sweep("smoke", [("lora.rank", "4,8"), ("eval.batch_size", "2,4")])


# --------------------------------------------------------------------------- report
RUN_METRICS = {
    "base/synth-aflw/mae_mean": 30.0, "base/synth-aflw/valid_rate": 0.5,
    "wta_cosine@0.9999/synth-aflw/mae_mean": 12.345, "wta_cosine@0.9999/synth-aflw/valid_rate": 0.98,
    "wta_cosine@0.9999/synth-aflw/grounding_acc50": 0.75,
    "wta_cosine@0.9999/aflw2000/mae_mean": 2.0,
    "wta_cosine@0.9999/synth-aflw/vs_cnn6d": -0.25,
}


def test_write_report(run_root):
    d = fake_run("default", RUN_METRICS)
    (d / "figures").mkdir()
    (d / "figures" / "mae_vs_threshold.png").write_bytes(b"png")
    (d / "figures" / "gallery.png").write_bytes(b"png")
    text = report.write_report(d).read_text()
    assert "# Run `default`" in text and "commit `0123456789`" in text
    assert "### synth-aflw" in text and "| `wta_cosine@0.9999` | 12.35 |" in text
    assert "98%" in text
    # the published 6DRepNet row beside real-data results, and the relative change
    assert "`6drepnet-published` | 3.97" in text and "-49.6%" in text
    assert text.index("figures/mae_vs_threshold.png") < text.index("figures/gallery.png")


def test_update_readme_between_markers(run_root, tmp_path):
    d = fake_run("default", RUN_METRICS)
    readme = tmp_path / "README.md"
    readme.write_text("# HPE\n\nintro\n\n<!-- results:start -->\nold numbers\n<!-- results:end -->\n\nmore\n")
    assert report.main(["readme", str(d), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("# HPE\n\nintro\n\n<!-- results:start -->\n")
    assert text.endswith("<!-- results:end -->\n\nmore\n")
    assert "Run `default` (profile `default`, 2026-01-02, commit `0123456789`" in text
    assert "| `wta_cosine@0.9999` | 12.35 | 98% | 75% | -25% |" in text
    once = text
    report.update_readme(d, readme)  # idempotent
    assert readme.read_text() == once


def test_update_readme_without_markers_fails_clearly(run_root, tmp_path, capsys):
    d = fake_run("default", RUN_METRICS)
    readme = tmp_path / "README.md"
    readme.write_text("# HPE\nno markers\n")
    with pytest.raises(ValueError, match="results:start"):
        report.update_readme(d, readme)
    assert report.main(["readme", str(d), "--readme", str(readme)]) == 2
    assert "results:start" in capsys.readouterr().err
    assert readme.read_text() == "# HPE\nno markers\n"


def test_training_summary_names_every_stage_steps_and_minutes():
    from hpelib.report import training_summary

    line = training_summary({"train/base/steps": 124, "train/base/minutes": 14.3,
                             "train/lora:hpe/steps": 33, "train/lora:hpe/minutes": 7.5,
                             "train/cnn6d@budget/steps": 900, "base/synth-aflw/mae_mean": 30.0}, 3000)
    assert line == ("Training: base 124 steps in 14.3 min, lora:hpe 33 steps in 7.5 min, "
                    "cnn6d@budget 900 steps; the run's notebooks took 50 min.\n")
    assert training_summary({"base/synth-aflw/mae_mean": 30.0}) == ""


def test_report_duration_counts_reused_stages_at_their_own_time():
    from hpelib.report import _duration_text

    assert _duration_text({"stages_s": 2184.0, "duration_s": 2184.5}) == ", 36.4 min"
    assert _duration_text({"stages_s": 2184.0, "duration_s": 420.0}) == \
        ", 36.4 min (the last invocation 7.0 min; earlier stages reused)"
    assert _duration_text({"stages_s": None, "duration_s": 60.0}) == ", 1.0 min"
    assert _duration_text({"stages_s": None, "duration_s": None}) == ""


def test_update_readme_fills_a_named_section_and_leaves_the_main_one(run_root, tmp_path):
    d = fake_run("default", RUN_METRICS)
    readme = tmp_path / "README.md"
    start = "<!-- results:start -->\nmain numbers\n<!-- results:end -->\n"
    readme.write_text(f"# HPE\n\n{start}\n<!-- results:pose:start -->\nold\n<!-- results:pose:end -->\n")
    assert report.main(["readme", str(d), "--readme", str(readme), "--section", "pose"]) == 0
    text = readme.read_text()
    assert text.startswith(f"# HPE\n\n{start}\n<!-- results:pose:start -->\n") and "old" not in text
    assert f"`python -m hpelib.report readme {d.as_posix()} --section pose`" in text
    assert "| `wta_cosine@0.9999` | 12.35 | 98% | 75% | -25% |" in text
    with pytest.raises(ValueError, match="results:other:start"):
        report.update_readme(d, readme, section="other")
    with pytest.raises(ValueError, match="section must be a name"):
        report.update_readme(d, readme, section="a b")
