"""Figures the notebooks show: data galleries, pose histograms, similarity heatmaps, result curves.

Every function returns a matplotlib `Figure` and draws nothing global; `save_figure` writes it
atomically into a run's `figures/` folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from hpelib import io


def save_figure(fig: "plt.Figure", path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` as PNG (atomically) and return the path."""
    path = Path(path)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


# --------------------------------------------------------------------------- data (00) and predictions
POSE_AXIS_COLORS = ("red", "green", "blue")  # the head's x (image right at zero pose), y (up), z (nose)


def _load_image(image):
    """An image given as an array `(H, W, 3)` or a path, as a uint8/float array."""
    import numpy as np

    if isinstance(image, (str, os.PathLike)):
        from hpelib.data.real import load_image

        return load_image(image)  # plain image files and BIWI's "file.npz#i" references
    return np.asarray(image)


def draw_pose_axes(ax, box, pose, length: float = 0.5, linestyle: str = "-", linewidth: float = 2.0) -> None:
    """Draw a head's x/y/z axes (red/green/blue) at the centre of its box, on image axes `ax`.

    The axes are the columns of `euler_to_matrix(yaw, pitch, roll)` (camera frame: x right, y up,
    z toward the viewer), projected orthographically: +y is drawn upward, and the blue z axis is
    the nose direction, so it points right for a positive yaw and down for a positive pitch.

    Args:
        box: `(x0, y0, x1, y1)` in pixels (image coordinates, origin top-left).
        pose: `(yaw, pitch, roll)` in degrees.
        length: axis length as a fraction of the box's larger side.
    """
    from hpelib.geometry import euler_to_matrix

    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    scale = length * max(x1 - x0, y1 - y0)
    R = euler_to_matrix(*pose)
    for k, color in enumerate(POSE_AXIS_COLORS):
        dx, dy = R[0, k] * scale, -R[1, k] * scale  # image y runs down
        ax.plot([cx, cx + dx], [cy, cy + dy], color=color, linestyle=linestyle, linewidth=linewidth,
                solid_capstyle="round")


def plot_gallery(images, boxes, poses, titles=None, pred_boxes=None, pred_poses=None, ncols: int = 4,
                 size: float = 2.4) -> "plt.Figure":
    """A grid of images with head boxes and pose axes; predictions, when given, drawn dashed.

    Args:
        images: sequence of `(H, W, 3)` arrays or image paths.
        boxes: per image `(x0, y0, x1, y1)` relative to the image size, or None to draw none.
        poses: per image `(yaw, pitch, roll)` in degrees, or None.
        titles: per image text; by default the pose, e.g. "y 12 p -5 r 3".
        pred_boxes, pred_poses: optional predictions in the same formats (None entries skipped),
            drawn dashed in white/axis colours on top of the labels.
        ncols: images per row.
        size: inches per panel.
    """
    import math

    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(images)
    if n == 0:
        raise ValueError("plot_gallery needs at least one image")
    for name, seq in (("boxes", boxes), ("poses", poses), ("titles", titles), ("pred_boxes", pred_boxes),
                      ("pred_poses", pred_poses)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} images")
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size * ncols, size * nrows * 1.08), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        img = _load_image(images[i])
        h, w = img.shape[:2]
        ax.imshow(img)
        layers = [(boxes, poses, "-", "yellow")]
        if pred_boxes is not None or pred_poses is not None:
            layers.append((pred_boxes, pred_poses, "--", "white"))
        for bseq, pseq, style, box_color in layers:
            box = None if bseq is None else bseq[i]
            pose = None if pseq is None else pseq[i]
            px = None
            if box is not None:
                x0, y0, x1, y1 = (float(v) for v in box)
                px = (x0 * w, y0 * h, x1 * w, y1 * h)
                ax.add_patch(Rectangle((px[0], px[1]), px[2] - px[0], px[3] - px[1], fill=False,
                                       edgecolor=box_color, linestyle=style, linewidth=1.5))
            if pose is not None and all(v is not None for v in pose):
                draw_pose_axes(ax, px if px is not None else (0, 0, w, h), [float(v) for v in pose],
                               linestyle=style, linewidth=2.0 if style == "-" else 1.5)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        if titles is not None:
            title = titles[i]
        elif poses is not None and poses[i] is not None:
            title = "y {:.0f} p {:.0f} r {:.0f}".format(*(float(v) for v in poses[i]))
        else:
            title = ""
        ax.set_title(title, fontsize=8)
    return fig


def plot_pose_histograms(df, bins: int = 36) -> "plt.Figure":
    """Histograms of yaw, pitch and roll, one colour per domain (`hue="domain"`).

    Args:
        df: a DataFrame with `yaw`, `pitch`, `roll` (degrees) and `domain` columns, e.g. the
            concatenated `hpelib.data.synth.load_split` frames of several domains.
    """
    import numpy as np
    import seaborn as sns
    from matplotlib.figure import Figure

    missing = [c for c in ("yaw", "pitch", "roll", "domain") if c not in df.columns]
    if missing:
        raise ValueError(f"plot_pose_histograms needs columns {missing}; the frame has {list(df.columns)}")
    fig = Figure(figsize=(12, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    edges = np.linspace(-100, 100, bins + 1)  # every label is within +-99
    for ax, angle in zip(axes, ("yaw", "pitch", "roll")):
        sns.histplot(data=df, x=angle, hue="domain", bins=edges, stat="density", common_norm=False,
                     element="step", ax=ax, legend=angle == "roll")
        ax.set_xlabel(f"{angle} (deg)")
    fig.suptitle("head pose per domain", fontsize=11)
    return fig


def plot_dataset_gallery(datasets, n_per_domain: int = 4, ncols: int | None = None) -> "plt.Figure":
    """The first scenes of every split with their labelled boxes and pose axes.

    Args:
        datasets: `{"train": {domain: df}, "test": {domain: df}}` (`prepare.load_datasets`).
        n_per_domain: scenes shown per split (one row each).
    """
    images, boxes, poses, titles = [], [], [], []
    for role, by_domain in datasets.items():
        for domain, df in by_domain.items():
            for row in df.head(n_per_domain).itertuples(index=False):
                images.append(row.image)
                boxes.append((row.x0, row.y0, row.x1, row.y1))
                poses.append((row.yaw, row.pitch, row.roll))
                titles.append(f"{domain} ({role})\ny {row.yaw:.0f} p {row.pitch:.0f} r {row.roll:.0f}")
    return plot_gallery(images, boxes, poses, titles=titles, ncols=ncols or n_per_domain)


# --------------------------------------------------------------------------- layer similarity (03) and merges (04)
def _similarity_grid(sim, panel: str):
    """`(blocks, modules, (n_blocks, n_modules) array of 1 - cos)` for one panel of a similarity table."""
    import numpy as np

    from hpelib.similarity import sorted_blocks

    rows = sim[sim["adapter"] == panel]
    blocks = sorted_blocks(sim["block"])
    modules = list(dict.fromkeys(sim["module"]))
    grid = np.full((len(blocks), len(modules)), np.nan)
    bi, mi = {b: i for i, b in enumerate(blocks)}, {m: j for j, m in enumerate(modules)}
    for b, m, v in zip(rows["block"], rows["module"], rows["one_minus_cos"]):
        grid[bi[b], mi[m]] = v
    return blocks, modules, grid


def plot_similarity_heatmap(sim, threshold: float | None = None) -> "plt.Figure":
    """Heatmap of `1 - cos` (log colour scale): blocks as rows, module types as columns, one panel
    per adapter (base reference) or adapter pair (pairwise); side by side, or one per row when
    there are many module types.

    sim: a `hpelib.similarity.layer_similarity` table (one reference and granularity).
    threshold: if given, the cells it claims are outlined (`gid="claimed"`): base reference, the
        adapter claims the layer (`cos < threshold`); pairwise, the pair is contested there. A dot
        marks the winner of each claimed unit (`hpelib.similarity.claim_table`). Cells with
        `1 - cos = 0` (adapter does not touch the layer) are left blank.
    """
    import math

    import numpy as np
    import seaborn as sns
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from hpelib.similarity import check_threshold, claim_table, table_kind

    reference, granularity = table_kind(sim)
    panels = list(dict.fromkeys(sim["adapter"]))
    values = sim["one_minus_cos"].to_numpy()
    positive = values[values > 0]
    vmin = float(positive.min()) if positive.size else 1e-12
    vmax = float(positive.max()) if positive.size else 1.0
    vmax = vmax if vmax > vmin else vmin * 10
    blocks, modules, _ = _similarity_grid(sim, panels[0])
    ncols = len(panels) if len(panels) * len(modules) <= 16 else 1  # wide panels: one per row
    nrows = math.ceil(len(panels) / ncols)
    width = 1.6 + ncols * (1.2 + 0.55 * len(modules))
    height = nrows * (1.8 + 0.28 * len(blocks))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flatten())
    winners = {}
    if threshold is not None:
        threshold = check_threshold(threshold)
        claims = claim_table(sim, threshold)
        winners = {(r.block, r.module): r.winner for r in claims.itertuples() if r.claimed}
    for k, (ax, panel) in enumerate(zip(axes, panels)):
        first_col = k % ncols == 0
        _, _, grid = _similarity_grid(sim, panel)
        mask = ~(grid > 0)
        sns.heatmap(np.where(mask, np.nan, grid), mask=mask, ax=ax, cmap="viridis_r",
                    norm=LogNorm(vmin=vmin, vmax=vmax), cbar=ax is axes[-1],
                    cbar_kws={"label": "1 − cos (log scale)"}, xticklabels=modules,
                    yticklabels=blocks if first_col else False, linewidths=0.5, linecolor="white")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("module")
        ax.set_ylabel("block" if first_col else "")
        ax.tick_params(axis="x", labelrotation=60)
        ax.tick_params(axis="y", labelrotation=0)
        if threshold is None:
            continue
        for i, b in enumerate(blocks):
            for j, m in enumerate(modules):
                if grid[i, j] > 1.0 - threshold:  # claimed by this adapter / contested by this pair
                    ax.add_patch(Rectangle((j, i), 1, 1, fill=False, edgecolor="red", linewidth=2.0, gid="claimed"))
                w = winners.get((b, m))
                is_winner = w == panel if reference == "base" else w in panel.split("|")
                if w is not None and is_winner and grid[i, j] > 1.0 - threshold:
                    label = "●" if reference == "base" else w[:1]
                    ax.text(j + 0.5, i + 0.5, label, ha="center", va="center", color="red", fontsize=8, gid="winner")
    what = "cos(W0, W0 + dW)" if reference == "base" else "cos(dW_i, dW_j)"
    title = f"1 − {what}, per {granularity}"
    if threshold is not None:
        title += f"; outlined: cos < {threshold:g}" + (" (● winner)" if reference == "base" else " (letter: winner)")
    fig.suptitle(title, fontsize=11)
    return fig


def plot_winner_map(claims, adapters) -> "plt.Figure":
    """Which adapter each unit takes (winner takes all), blocks as rows, module types as columns;
    grey: unclaimed (keeps W0).

    claims: a `hpelib.similarity.claim_table`; adapters: names in colour order.
    """
    import numpy as np
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from hpelib.similarity import sorted_blocks

    blocks = sorted_blocks(claims["block"])
    modules = list(dict.fromkeys(claims["module"]))
    code = {a: i + 1 for i, a in enumerate(adapters)}
    grid = np.full((len(blocks), len(modules)), np.nan)
    bi, mi = {b: i for i, b in enumerate(blocks)}, {m: j for j, m in enumerate(modules)}
    for r in claims.itertuples():
        grid[bi[r.block], mi[r.module]] = code[r.winner] if r.claimed else 0
    palette = ["#d9d9d9"] + [plt.get_cmap("tab10")(i % 10) for i in range(len(adapters))]
    fig = Figure(figsize=(2.6 + 0.55 * len(modules), 1.8 + 0.28 * len(blocks)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(np.ma.masked_invalid(grid), cmap=ListedColormap(palette), vmin=-0.5, vmax=len(adapters) + 0.5,
              aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(modules)), modules, rotation=60, ha="right")
    ax.set_yticks(range(len(blocks)), blocks)
    ax.set_xlabel("module")
    ax.set_ylabel("block")
    handles = [Patch(color=palette[0], label="base (W0)")] + [Patch(color=palette[code[a]], label=a) for a in adapters]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("winner per unit", fontsize=10)
    return fig


def plot_threshold_sweep(sweep) -> "plt.Figure":
    """Share of target-layer weights and units won per adapter along a threshold grid.

    sweep: a `hpelib.similarity.threshold_sweep` table (several may be concatenated: one line
    style per reference / granularity). The x axis is `1 - threshold` (log), so stricter
    thresholds (closer to 1) are to the left.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_share, ax_units = fig.subplots(1, 2)
    adapters = list(dict.fromkeys(sweep["adapter"]))
    colours = {a: ("0.5" if a == "(base)" else plt.get_cmap("tab10")(i % 10)) for i, a in enumerate(adapters)}
    styles = ["-", "--", ":", "-."]
    combos = list(dict.fromkeys(zip(sweep["reference"], sweep["granularity"])))
    for k, (ref, gran) in enumerate(combos):
        part = sweep[(sweep["reference"] == ref) & (sweep["granularity"] == gran)]
        for a in adapters:
            line = part[part["adapter"] == a].sort_values("one_minus_threshold")
            if line.empty:
                continue
            label = a if len(combos) == 1 else f"{a} ({ref}, {gran})"
            kw = dict(color=colours[a], linestyle=styles[k % len(styles)], marker="o", markersize=3, label=label)
            ax_share.plot(line["one_minus_threshold"], line["share"], **kw)
            ax_units.plot(line["one_minus_threshold"], line["n_units"], **kw)
    for ax, ylabel in ((ax_share, "share of target-layer weights"), (ax_units, "units (layers or blocks) won")):
        ax.set_xscale("log")
        ax.set_xlabel("1 − threshold")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    ax_share.set_ylim(-0.02, 1.02)
    ax_units.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    title = "winner-takes-all claims along the threshold"
    if len(combos) == 1:
        title += f" ({combos[0][0]} reference, per {combos[0][1]})"
    fig.suptitle(title, fontsize=11)
    return fig


# --------------------------------------------------------------------------- evaluation (05)
def plot_merge_curves(metrics, domains=None, methods=("wta_cosine", "task_arithmetic")) -> "plt.Figure":
    """MAE of each merge method against its parameter (threshold, lambda), one panel per method,
    one line per domain; the valid-format rate on a second axis (dashed).

    Thresholds are placed by `-log10(1 - threshold)` (0.999, 0.9999, ... equally spaced) and
    labelled with their values.

    Args:
        metrics: flat `<variant>/<domain>/<metric>` metrics, variants named `method@param`.
    """
    from hpelib.evaluate import metric_curve, results_table

    if domains is None:
        domains = list(results_table(metrics, columns=("valid_rate",)).columns.get_level_values(0).unique())

    def position(method, values):
        values = np.asarray(values, dtype=float)
        return -np.log10(np.clip(1 - values, 1e-12, None)) if method == "wta_cosine" else values

    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods), 3.6), squeeze=False)
    for ax, method in zip(axes[0], methods):
        twin = ax.twinx()
        params: set[float] = set()
        any_mae = False
        for i, domain in enumerate(domains):
            mae = metric_curve(metrics, method, domain, "mae_mean").dropna()
            valid = metric_curve(metrics, method, domain, "valid_rate")
            params |= set(valid.index)
            if len(mae):
                any_mae = True
                ax.plot(position(method, mae.index), mae.values, "o-", color=f"C{i}", label=domain)
            if len(valid):
                twin.plot(position(method, valid.index), valid.values, "s--", color=f"C{i}", alpha=0.6,
                          label=None if len(mae) else domain)
        ticks = sorted(params)
        ax.set_xticks(position(method, ticks), [f"{t:g}" for t in ticks])
        if not any_mae:
            ax.text(0.5, 0.5, "no valid head-pose answers", transform=ax.transAxes, ha="center", color="grey")
        ax.set(title=method, xlabel="threshold (log-spaced in 1 - threshold)" if method == "wta_cosine" else "lambda",
               ylabel="mean MAE (deg), valid answers")
        twin.set(ylabel="valid-format rate (dashed)", ylim=(-0.02, 1.02))
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        if handles:
            ax.legend(handles=handles, fontsize=7, loc="upper left")
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_error_vs_yaw(table, bins: int = 12) -> "plt.Figure":
    """Mean absolute error per angle against the true yaw, per variant (head-pose answers only;
    invalid answers are left out here and counted in the valid rate)."""
    import pandas as pd
    import seaborn as sns

    hpe = table[(table["task"] == "hpe") & table["err_mean"].notna()].copy()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if len(hpe):
        edges = np.linspace(-99, 99, bins + 1)
        hpe["yaw_bin"] = pd.cut(hpe["gt_yaw"], edges).apply(lambda iv: iv.mid).astype(float)
        sns.lineplot(data=hpe, x="yaw_bin", y="err_mean", hue="variant", marker="o", errorbar=None, ax=ax)
    ax.set(xlabel="true yaw (deg)", ylabel="mean abs. error (deg)", title="error against true yaw")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_answer_kinds(table, variants=None, max_panels: int = 8) -> "plt.Figure":
    """Answer-kind confusion per variant: prompt type (rows) x answer kind (columns), as rates."""
    import seaborn as sns

    from hpelib.evaluate import answer_kind_confusion

    variants = list(dict.fromkeys(table["variant"]))[:max_panels] if variants is None else variants
    ncols = min(4, len(variants))
    nrows = -(-len(variants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.4 * nrows), squeeze=False)
    for ax, variant in zip(axes.flat, variants):
        t = table[table["variant"] == variant]
        conf = answer_kind_confusion(t["prompt_type"].tolist(), t["kind"].tolist(), normalize=True)
        sns.heatmap(conf, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="Blues", cbar=False, ax=ax)
        ax.set(title=variant, xlabel="answer kind", ylabel="prompt")
    for ax in list(axes.flat)[len(variants):]:
        ax.set_axis_off()
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_answer_gallery(table, samples_by_domain, kind: str = "worst", n: int = 8) -> "plt.Figure":
    """Head-pose answers drawn on their images: the `worst` valid ones (largest mean error) or the
    `blended` ones, with true (solid) and predicted (dashed) boxes and pose axes.

    Args:
        table: per-sample table of `evaluate_run` (needs `image`, `gt_*`, `pred_*` columns).
        samples_by_domain: the evaluated samples, to find each row's image.
    """
    from hpelib import prompts

    images = {s.meta.get("image"): s.image for samples in samples_by_domain.values() for s in samples}
    hpe = table[table["task"] == "hpe"]
    rows = (hpe.dropna(subset=["err_mean"]).nlargest(n, "err_mean") if kind == "worst"
            else hpe[hpe["kind"] == kind].head(n))
    if not len(rows):
        fig, ax = plt.subplots(figsize=(6, 1))
        ax.text(0.5, 0.5, f"no {kind} answers", ha="center", va="center")
        ax.set_axis_off()
        plt.close(fig)
        return fig
    gt_box = rows[["gt_x0", "gt_y0", "gt_x1", "gt_y1"]].to_numpy().tolist()
    gt_pose = rows[["gt_yaw", "gt_pitch", "gt_roll"]].to_numpy().tolist()
    parsed = [prompts.parse_response(a) for a in rows["answer"].fillna("")]
    pred_box = [p.box for p in parsed]
    pred_pose = [None if p.yaw is None or p.pitch is None or p.roll is None else (p.yaw, p.pitch, p.roll) for p in parsed]
    titles = [f"{r.variant} {r.domain}\n{str(r.answer)[:40]}" for r in rows.itertuples()]
    return plot_gallery([images[i] for i in rows["image"]], gt_box, gt_pose, titles=titles,
                        pred_boxes=pred_box, pred_poses=pred_pose)
