"""Figures of a sweep (matplotlib, PNG): each metric against each swept parameter, and a sheet
of the first samples of every point.

In the metric figures, keys that always change together (zipped axes) form one parameter;
points that differ only in ``seed`` are repeats of one setting, drawn as their mean with a
bar from the lowest to the highest value; the baseline is a dashed horizontal line.
"""

import math
import os

import numpy as np

from .plan import format_value
from .report import METRIC_NAMES

# Higher or lower is better, for the axis labels.
BETTER = {"fid": "lower", "sfid": "lower", "inception_score": "higher", "precision": "higher",
          "recall": "higher", "accuracy": "higher"}
PARAM_LABELS = {
    "guide_scale": "guidance scale s (1 = no guidance)",
    "blur_sigma": "SAG blur sigma (pixels)",
    "guide_start": "guide_start (guided while respaced t < guide_start)",
    "sel_attn_block": "attention block",
    "sel_attn_depth": "attention block depth (index in its block list)",
    "classifier_scale": "classifier guidance scale",
    "timestep_respacing": "sampling steps",
    "sag_heads": "attention heads used for the map",
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
    if len(group) == 1:
        return PARAM_LABELS.get(group[0], group[0])
    return " / ".join(group)


def metric_figure(path, group, records, metrics, others, baseline, title):
    """One PNG: a panel per metric against the parameter ``group``, one line per setting of the
    ``others``; repeats (seeds) as mean with min-max bars; the baseline as a dashed line."""
    plt = _matplotlib()
    numeric = all(_is_number(_x_value(r, group)) for r in records)
    categories = list(dict.fromkeys(_x_value(r, group) for r in records)) if not numeric else None
    lines = {}
    for r in records:
        line = tuple((g, " ".join(format_value(r["settings"].get(k)) for k in g)) for g in others)
        lines.setdefault(line, {}).setdefault(_x_value(r, group), []).append(r)
    ncols = min(len(metrics), 4)
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.5 * nrows + 0.9), squeeze=False)
    handles = {}
    for ax, metric in zip(axes.flat, metrics):
        for i, (line, by_x) in enumerate(lines.items()):
            xs = sorted(by_x) if numeric else sorted(by_x, key=categories.index)
            values = [[r["metrics"].get(metric) for r in by_x[x]] for x in xs]
            values = [[v for v in vs if v is not None and not math.isnan(v)] for vs in values]
            keep = [j for j, vs in enumerate(values) if vs]
            if not keep:
                continue
            px = [xs[j] if numeric else categories.index(xs[j]) for j in keep]
            mean = [float(np.mean(values[j])) for j in keep]
            low = [m - min(values[j]) for m, j in zip(mean, keep)]
            high = [max(values[j]) - m for m, j in zip(mean, keep)]
            label = ", ".join(f"{'/'.join(g)}={v}" for g, v in line) or "sweep"
            if any(len(values[j]) > 1 for j in keep):
                label += " (bars: min-max over seeds)"
            h = ax.errorbar(px, mean, yerr=[low, high], marker="o", ms=4, capsize=3, lw=1.4,
                            color=plt.cm.tab10(i % 10) if len(lines) <= 10 else plt.cm.viridis(i / len(lines)))
            handles.setdefault(label, h)
        if baseline is not None and baseline["metrics"].get(metric) is not None:
            h = ax.axhline(baseline["metrics"][metric], ls="--", color="0.35", lw=1.2)
            handles.setdefault(f"baseline ({baseline['label']})", h)
        ax.set_xlabel(_param_label(group))
        better = BETTER.get(metric)
        ax.set_ylabel(METRIC_NAMES.get(metric, metric) + (f" ({better} is better)" if better else ""))
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


def metric_figures(out_dir, records, swept, metrics, baseline, title):
    """``fig_<parameter>.png`` for each varying parameter; returns the paths."""
    groups = parameters(records, swept)
    paths = []
    for group in groups:
        others = [g for g in groups if g != group]
        name = "fig_" + "+".join(group) + ".png"
        full_title = f"{title}\n{', '.join(METRIC_NAMES.get(m, m) for m in metrics)} vs {' / '.join(group)}"
        paths.append(metric_figure(os.path.join(out_dir, name), group, records, metrics, others, baseline,
                                   full_title))
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
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(title + ("; column = class label" if same_labels else ""), fontsize=9, pad=16 if same_labels else 6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
