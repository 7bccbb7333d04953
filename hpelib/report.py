"""A run's report and the README's results section, generated from the run folder.

    python -m hpelib.report report runs/default    # writes runs/default/report.md
    python -m hpelib.report readme runs/default    # refreshes README.md between the markers
    python -m hpelib.report readme runs/pose --section pose   # between <!-- results:pose:start/end -->

The README's numbers are never typed by hand: `update_readme` replaces the text between
`<!-- results:start -->` and `<!-- results:end -->` (or a named section's
`<!-- results:NAME:start -->` and `<!-- results:NAME:end -->`) with the results table of a run (its
name, profile, date and git commit included), and fails if the markers are missing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from hpelib import io, paths
from hpelib.evaluate import SIXDREPNET_PUBLISHED, published_metrics, relative_changes, results_table

START_MARKER = "<!-- results:start -->"
END_MARKER = "<!-- results:end -->"

# per-domain tables of the report: (metric, header, format)
REPORT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mae_mean", "MAE mean (°)", "{:.2f}"),
    ("mae_yaw", "yaw", "{:.2f}"),
    ("mae_pitch", "pitch", "{:.2f}"),
    ("mae_roll", "roll", "{:.2f}"),
    ("mae_all", "MAE_all (°)", "{:.2f}"),
    ("coverage", "coverage", "{:.0%}"),  # baselines: share of heads MediaPipe finds (the CNN: all)
    ("valid_rate", "valid", "{:.0%}"),
    ("blended_rate", "blended", "{:.0%}"),
    ("box_acc50", "head box Acc@0.5", "{:.0%}"),
    ("grounding_acc50", "grounding Acc@0.5", "{:.0%}"),
    ("grounding_valid_rate", "grounding valid", "{:.0%}"),
    ("vs_cnn6d", "vs 6DRepNet-style CNN", "{:+.1%}"),  # against cnn6d@converged (evaluate.reference_metrics)
)
# the README's compact table: one column per domain and metric
README_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mae_mean", "MAE", "{:.2f}"),
    ("valid_rate", "valid", "{:.0%}"),
    ("grounding_acc50", "grounding Acc@0.5", "{:.0%}"),
    ("vs_cnn6d", "vs CNN", "{:+.0%}"),
)
# figures shown first in the report when present (the rest follow in name order)
MAIN_FIGURES = ("mae_vs_threshold", "mae_vs_lambda", "error_vs_yaw", "confusion")


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    try:
        return spec.format(v)
    except (ValueError, TypeError):
        return str(v)


def _md(df: pd.DataFrame, index_header: str) -> str:
    headers = [index_header, *map(str, df.columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * len(df.columns)) + "|"]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([f"`{idx}`", *map(str, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def _formatted(table: pd.DataFrame, columns: Sequence[tuple[str, str, str]], domain: str | None = None) -> pd.DataFrame:
    """Formatted text cells of `results_table` output, for one domain or (None) all domains."""
    out = pd.DataFrame(index=table.index)
    domains = [domain] if domain else list(dict.fromkeys(table.columns.get_level_values(0)))
    for d in domains:
        for metric, header, spec in columns:
            if (d, metric) in table.columns and table[(d, metric)].notna().any():
                name = header if domain else f"{d} {header}"
                out[name] = [_fmt(v, spec) for v in table[(d, metric)]]
    return out.loc[:, list(out.columns)]


def _domains(metrics: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(k.split("/")[1] for k in metrics if len(k.split("/")) == 3))


def _with_references(metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics plus 6DRepNet's published rows for the real test sets it evaluated."""
    real = [d for d in _domains(metrics) if d in SIXDREPNET_PUBLISHED]
    return {**metrics, **published_metrics(real)} if real else dict(metrics)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Name, profile, date and commit of a run (from `run_info.json`, else `config.json`)."""
    info = io.read_json(run_dir / paths.RUN_INFO) if (run_dir / paths.RUN_INFO).exists() else {}
    cfg = io.read_json(run_dir / paths.RUN_CONFIG) if (run_dir / paths.RUN_CONFIG).exists() else {}
    git = info.get("git") or {}
    commit = git.get("commit")
    return {
        "name": run_dir.name,
        "profile": info.get("profile") or cfg.get("profile") or "?",
        "date": (info.get("finished") or info.get("started") or "")[:10] or "?",
        "commit": (commit[:10] + ("+dirty" if git.get("dirty") else "")) if commit else "uncommitted",
        "overrides": info.get("overrides") or {},
        "duration_s": info.get("duration_s"),
        # each stage's own execution time, also for stages a later invocation reused
        "stages_s": sum(n.get("duration_s") or 0 for n in info.get("notebooks", [])) or None,
    }


def training_summary(metrics: dict[str, Any], duration_s: float | None = None) -> str:
    """One line saying how much each stage trained (`train/<stage>/steps` and `.../minutes`) and
    how long the run took (`duration_s`: the notebooks' own times, reused stages included): a
    number read without it can hide a starved training."""
    stages = dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith("train/") and k.endswith("/steps"))
    parts = [f"{stage} {int(metrics[f'train/{stage}/steps'])} steps"
             + (f" in {metrics[f'train/{stage}/minutes']:.1f} min" if f"train/{stage}/minutes" in metrics else "")
             for stage in stages]
    # a base or CNN taken from its cache counts only its loading here, its training above
    total = f"; the run's notebooks took {duration_s / 60:.0f} min" if duration_s else ""
    return ("Training: " + ", ".join(parts) + total + ".\n") if parts else ""


def _load_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / paths.METRICS
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the run has no metrics yet (run 05_evaluate)")
    return io.read_json(path)


def results_markdown(run_dir: str | os.PathLike, compact: bool = True) -> str:
    """The results table(s) of a run as markdown: compact (README) or one table per domain."""
    run_dir = paths.run_dir(run_dir)
    metrics = _with_references(_load_metrics(run_dir))
    cols = README_COLUMNS if compact else REPORT_COLUMNS
    table = results_table(metrics, [m for m, _, _ in cols])
    if table.empty or table.isna().all().all():
        return "_No variant/domain metrics in metrics.json._\n"
    if compact:
        return _md(_formatted(table, cols), "variant")
    parts = []
    rel = relative_changes(metrics) if any(d in SIXDREPNET_PUBLISHED for d in _domains(metrics)) else {}
    for d in dict.fromkeys(table.columns.get_level_values(0)):
        f = _formatted(table, cols, d)
        if f.empty:
            continue
        keys = {k.split("/")[0]: v for k, v in rel.items() if k.split("/")[1] == d}
        if keys:
            f["vs 6DRepNet (published)"] = [_fmt(keys.get(v), "{:+.1%}") for v in f.index]
        f = f[(f != "–").any(axis=1)]
        parts.append(f"### {d}\n\n" + _md(f, "variant"))
    return "\n".join(parts)


def _duration_text(s: dict[str, Any]) -> str:
    """`, 36.4 min` (the notebooks' own times), plus the last invocation's when stages were reused."""
    stages, last = s.get("stages_s"), s.get("duration_s")
    if not isinstance(stages, (int, float)):
        return f", {last / 60:.1f} min" if isinstance(last, (int, float)) else ""
    text = f", {stages / 60:.1f} min"
    if isinstance(last, (int, float)) and abs(last - stages) > 60:
        text += f" (the last invocation {last / 60:.1f} min; earlier stages reused)"
    return text


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `runs/NAME/report.md`: what ran, the results per domain, links to the figures."""
    run_dir = paths.run_dir(run_dir)
    s = run_summary(run_dir)
    lines = [f"# Run `{s['name']}`", "",
             f"Profile `{s['profile']}`, {s['date']}, commit `{s['commit']}`"
             + (f", overrides `{s['overrides']}`" if s["overrides"] else "")
             + _duration_text(s) + ".",
             "",
             "MAE in degrees over valid answers (wrap-aware); `valid`: share of answers in the head-pose "
             "format; `MAE_all`: invalid answers counted as misses at the run's penalty; Acc@0.5: IoU >= 0.5, "
             "invalid answers counted as misses. Samples with any |angle| > 99° are dropped (AFLW protocol).",
             "", training_summary(_load_metrics(run_dir)),
             "## Results", "", results_markdown(run_dir, compact=False)]
    figs = _figures(run_dir)
    if figs:
        lines += ["## Figures", ""]
        for f in figs:
            rel = f.relative_to(run_dir).as_posix()
            lines += [f"### {f.stem.replace('_', ' ')}", "", f"![{f.stem}]({rel})", ""]
    nbs = sorted((run_dir / paths.NOTEBOOKS_DIR).glob("*.ipynb"))
    if nbs:
        lines += ["## Executed notebooks", ""]
        lines += [f"- [{p.name}]({p.relative_to(run_dir).as_posix()})" for p in nbs]
        lines.append("")
    return io.write_text(run_dir / paths.REPORT, "\n".join(lines).rstrip() + "\n")


def _figures(run_dir: Path) -> list[Path]:
    d = run_dir / paths.FIGURES_DIR
    if not d.is_dir():
        return []
    figs = sorted(p for p in d.rglob("*") if p.suffix.lower() in (".png", ".svg", ".jpg"))

    def rank(p: Path) -> tuple:
        main = [i for i, m in enumerate(MAIN_FIGURES) if p.stem.startswith(m)]
        return (main[0] if main else len(MAIN_FIGURES), p.as_posix())

    return sorted(figs, key=rank)


def markers(section: str | None = None) -> tuple[str, str]:
    """The README's start and end markers of the results section (`None`) or of a named one."""
    if section is None:
        return START_MARKER, END_MARKER
    if not section or not section.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"section must be a name of letters, digits, '-' and '_', got {section!r}")
    return f"<!-- results:{section}:start -->", f"<!-- results:{section}:end -->"


def readme_section(run_dir: str | os.PathLike, section: str | None = None) -> str:
    """The generated text that goes between the README's markers (of `section`, if named)."""
    run_dir = paths.run_dir(run_dir)
    s = run_summary(run_dir)
    command = f"python -m hpelib.report readme {_display(run_dir)}" + (f" --section {section}" if section else "")
    return (f"<!-- generated by `{command}`; do not edit by hand -->\n"
            f"Run `{s['name']}` (profile `{s['profile']}`, {s['date']}, commit `{s['commit']}`"
            + (f", overrides `{s['overrides']}`" if s["overrides"] else "") + "). "
            "MAE in degrees over valid answers; valid: share of answers in the head-pose format; "
            "grounding Acc@0.5 on grounding prompts. Full tables and figures: "
            f"`{_display(run_dir / paths.REPORT)}`.\n\n"
            + training_summary(_load_metrics(run_dir), s["stages_s"] or s["duration_s"]) + "\n"
            + results_markdown(run_dir, compact=True))


def _display(p: Path) -> str:
    try:
        return p.resolve().relative_to(paths.project_root()).as_posix()
    except ValueError:
        return p.as_posix()


def update_readme(run_dir: str | os.PathLike, readme_path: str | os.PathLike | None = None,
                  section: str | None = None) -> Path:
    """Replace the README text between the markers (`markers(section)`) by the run's results.

    Raises:
        ValueError: a marker is missing, repeated, or the end comes before the start.
    """
    readme = Path(readme_path or paths.project_root() / "README.md")
    text = readme.read_text(encoding="utf-8")
    start_marker, end_marker = markers(section)
    n_start, n_end = text.count(start_marker), text.count(end_marker)
    if n_start != 1 or n_end != 1:
        raise ValueError(f"{readme}: needs exactly one {start_marker} and one {end_marker} line around the "
                         f"results section (found {n_start} and {n_end}); add them where the table belongs")
    start = text.index(start_marker) + len(start_marker)
    end = text.index(end_marker)
    if end < start:
        raise ValueError(f"{readme}: {end_marker} comes before {start_marker}")
    new = text[:start] + "\n" + readme_section(run_dir, section) + text[end:]
    return io.write_text(readme, new)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpelib.report",
                                description="Write a run's report.md, or refresh the README's results section.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write RUN/report.md")
    r.add_argument("run", help="run name under runs/ or a path (e.g. runs/default)")
    m = sub.add_parser("readme", help="replace the README's results section (between the markers)")
    m.add_argument("run", help="run name under runs/ or a path (e.g. runs/default)")
    m.add_argument("--readme", default=None, help="README to update (default: the project's README.md)")
    m.add_argument("--section", default=None,
                   help="a named results section (<!-- results:NAME:start --> ... :end -->) instead of the main one")
    args = p.parse_args(argv)
    try:
        if args.command == "report":
            print(write_report(args.run))
        else:
            print(update_readme(args.run, args.readme, args.section))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
