"""Figures of a sweep (matplotlib, PNG): each metric against each swept parameter, and a sheet
of the first samples of every point.

In the metric figures, keys that always change together (zipped axes) form one parameter.
Points that differ only in ``seed`` are repeats of one setting: the line goes through the value
at the sweep's own seed (so every line compares the same seeds) and a bar spans the lowest to the
highest value over the seeds. The baseline is a dashed horizontal line (its value at the sweep's
seed) with a band over its repeats.

A derived column (``derived.py``, e.g. ``nfe``) can be the x axis too (``derived_figure``): the
swept keys it stands for no longer split the lines, the others do.
"""

import math
import os

import numpy as np

from .derived import DERIVED
from .plan import format_value
from .report import METRIC_NAMES

# Higher or lower is better, for the axis labels.
BETTER = {"fid": "lower", "sfid": "lower", "inception_score": "higher", "precision": "higher",
          "recall": "higher", "accuracy": "higher"}
PARAM_LABELS = {
    "guide_scale": "guidance scale s; 1 = no guidance",
    "blur_sigma": "SAG blur sigma, pixels",
    "guide_start": "guided while the respaced step t < guide_start",
    "sel_attn_block": "block list of the attention map",
    "sel_attn_depth": "index in the --sel_attn_block list",
    "classifier_scale": "classifier guidance scale",
    "timestep_respacing": "sampling steps",
    "sag_heads": "heads used for the attention map",
    "drop_layers": "perturbed attention layers",
}


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parameters(records, swept):
    """Swept keys that vary (seed excluded), grouped when they change together (zipped axes)."""
    varying = [k for k in swept if k != "seed" and len({format_value(r["settings"].get(k)) for r in records}) > 1]
    groups = []
    for key in varying:
        for group in groups:
            pairs = {(tuple(format_value(r["settings"].get(g)) for g in group), format_value(r["settings"].get(key)))
                     for r in records}
            if len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}):
                group.append(key)
                break
        else:
            groups.append([key])
    return [tuple(g) for g in groups]


def _x_value(record, group):
    values = [record["settings"].get(k) for k in group]
    return values[0] if len(values) == 1 and _is_number(values[0]) else " ".join(format_value(v) for v in values)


def _param_label(group):
    """The flag name(s), with what they mean where known (``guide_scale (guidance scale s; ...)``)."""
    if len(group) == 1 and group[0] in PARAM_LABELS:
        return f"{group[0]} ({PARAM_LABELS[group[0]]})"
    return " / ".join(group)


def _center(records, metric, seed):
    """``(value at the sweep's seed (else the mean), lowest, highest, count)`` over repeats."""
    found = [(r["seed"], r["metrics"].get(metric)) for r in records]
    found = [(s, v) for s, v in found if v is not None and not math.isnan(v)]
    if not found:
        return None
    values = [v for _, v in found]
    at_seed = [v for s, v in found if s == seed]
    return (at_seed[0] if at_seed else float(np.mean(values))), min(values), max(values), len(values)


def metric_figure(path, group, records, metrics, others, baseline, baseline_label, seed, title,
                  x_of=None, x_label=None, log_x=False):
    """One PNG: a panel per metric against the parameter ``group``, one line per setting of the
    ``others``; repeats over seeds as bars (see the module docstring); the baseline records (the
    baseline and its repeats) as a dashed line with a band. ``x_of(record)`` and ``x_label``
    replace the parameter's value and name on the x axis (a derived column); ``log_x``: log scale."""
    plt = _matplotlib()
    x_of = x_of or (lambda r: _x_value(r, group))
    numeric = all(_is_number(x_of(r)) for r in records)
    categories = list(dict.fromkeys(x_of(r) for r in records)) if not numeric else None
    lines = {}
    for r in records:
        line = tuple((g, " ".join(format_value(r["settings"].get(k)) for k in g)) for g in others)
        lines.setdefault(line, {}).setdefault(x_of(r), []).append(r)
    ncols = min(len(metrics), 4)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.5 * nrows + 0.9), squeeze=False)
    handles = {}
    for ax, metric in zip(axes.flat, metrics):
        for i, (line, by_x) in enumerate(lines.items()):
            xs = sorted(by_x) if numeric else sorted(by_x, key=categories.index)
            found = [(x, _center(by_x[x], metric, seed)) for x in xs]
            found = [(x, c) for x, c in found if c is not None]
            if not found:
                continue
            px = [x if numeric else categories.index(x) for x, _ in found]
            mid = [c[0] for _, c in found]
            bars = [[c[0] - c[1] for _, c in found], [c[2] - c[0] for _, c in found]]
            label = ", ".join(f"{'/'.join(g)}={v}" for g, v in line) or "sweep"
            if any(c[3] > 1 for _, c in found):
                label += " (bar: range over seeds)"
            h = ax.errorbar(px, mid, yerr=bars, marker="o", ms=4, capsize=3, lw=1.4,
                            color=plt.cm.tab10(i % 10) if len(lines) <= 10 else plt.cm.viridis(i / len(lines)))
            handles.setdefault(label, h)
        base = _center(baseline, metric, seed) if baseline else None
        if base is not None:
            h = ax.axhline(base[0], ls="--", color="0.35", lw=1.2)
            if base[3] > 1:
                ax.axhspan(base[1], base[2], color="0.5", alpha=0.15, lw=0)
            text = f"baseline ({baseline_label}" + (f"; band: range over {base[3]} seeds)" if base[3] > 1 else ")")
            handles.setdefault(text, h)
        ax.set_xlabel(x_label or _param_label(group))
        if log_x and numeric:
            ax.set_xscale("log")
            ax.minorticks_off()
        better = BETTER.get(metric)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric) + (f" ({better} is better)" if better else ""))
        xs_all = sorted({x_of(r) for r in records}) if numeric else []
        if numeric and (len(xs_all) <= 8 or log_x):
            ax.set_xticks(xs_all)
            ax.set_xticklabels([format_value(x) for x in xs_all], fontsize=8 if len(xs_all) > 8 else None)
        if not numeric:
            ax.set_xticks(range(len(categories)))
            ax.set_xticklabels(categories, rotation=20 if max(len(str(c)) for c in categories) > 8 else 0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)),
               fontsize=8, frameon=False)
    legend_rows = math.ceil(len(handles) / 3)
    fig.tight_layout(rect=(0, min(0.45, 0.035 * legend_rows + 0.04 / nrows), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_figures(out_dir, records, swept, metrics, baseline, baseline_label, seed, title):
    """``fig_<parameter>.png`` for each varying parameter; returns the paths."""
    groups = parameters(records, swept)
    paths = []
    for group in groups:
        others = [g for g in groups if g != group]
        name = "fig_" + "+".join(group) + ".png"
        full_title = f"{title}\n{', '.join(METRIC_NAMES.get(m, m) for m in metrics)} vs {' / '.join(group)}"
        paths.append(metric_figure(os.path.join(out_dir, name), group, records, metrics, others, baseline,
                                   baseline_label, seed, full_title))
    return paths


def sample_sheet(path, rows, title, scale=None):
    """A grid of images: one row per point (its label on the left), the same sample indices in
    every column (class labels on top when all rows share them)."""
    plt = _matplotlib()
    n = max(len(images) for _, images, _ in rows)
    h, w = rows[0][1].shape[1:3]
    pad = max(1, h // 16)
    sheet = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, (_, images, _) in enumerate(rows):
        for j, image in enumerate(images):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            sheet[y:y + h, x:x + w] = image
    cell = scale or max(0.45, min(1.2, 36 / max(h, 1) * 0.5))
    label_width = 0.09 * max(len(label) for label, _, _ in rows) + 0.3
    fig_w, fig_h = n * cell + label_width + 0.3, len(rows) * cell + 0.9
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    ax.imshow(sheet, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))])
    ax.set_yticklabels([label for label, _, _ in rows], fontsize=8)
    labels = [lab for _, _, lab in rows]
    same_labels = all(lab is not None for lab in labels) and all(
        np.array_equal(labels[0][:n], lab[:n]) for lab in labels)
    if same_labels:
        ax.xaxis.tick_top()
        ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(labels[0][:n]))])
        ax.set_xticklabels([f"y={int(v)}" for v in labels[0][:n]], fontsize=7)
    else:
        ax.set_xticks([])
        for i, (_, images, lab) in enumerate(rows):
            for j in range(len(images) if lab is not None else 0):
                ax.text(pad + j * (w + pad) + 1, pad + i * (h + pad) + 1, str(int(lab[j])), fontsize=6,
                        color="white", va="top", ha="left",
                        bbox=dict(boxstyle="square,pad=0.1", fc="black", alpha=0.6, lw=0))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    any_labels = any(lab is not None for lab in labels)
    note = "; column = class label" if same_labels else "; corner = class label" if any_labels else ""
    ax.set_title(title + note, fontsize=9, pad=16 if same_labels else 6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def derived_figure(out_dir, column, records, swept, metrics, baseline, baseline_label, seed, title):
    """``fig_<column>.png``: each metric against a derived column (``derived.DERIVED``, e.g.
    ``nfe``), one line per setting of the swept keys the column does not stand for (e.g. one
    per sampler and guidance scale). Points without a value are left out. Returns the path, or
    None when no point has a value."""
    spec = DERIVED[column]
    has = [r for r in records if r["derived"].get(column) is not None]
    if not has:
        return None
    others = [g for g in parameters(records, swept) if not set(g) <= set(spec.replaces)]
    base = [r for r in baseline if r["derived"].get(column) is not None]
    full_title = f"{title}\n{', '.join(METRIC_NAMES.get(m, m) for m in metrics)} vs {column}"
    return metric_figure(os.path.join(out_dir, f"fig_{column}.png"), (column,), has, metrics, others, base,
                         baseline_label, seed, full_title, x_of=lambda r: r["derived"][column],
                         x_label=spec.label, log_x=spec.log)
