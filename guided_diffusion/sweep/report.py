"""The sweep's results as sweep.csv, sweep.json and sweep.md (one row per point)."""

import csv
import io
import json
import math
import os

from .. import durable
from .derived import DERIVED, derive
from .plan import format_value

# Evaluator result keys in the order tables show them; others follow in their own order.
METRIC_ORDER = ("fid", "sfid", "inception_score", "precision", "recall", "accuracy")
METRIC_NAMES = {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "precision",
                "recall": "recall", "accuracy": "label accuracy"}
NOT_METRICS = ("sample", "num_samples")


def metric_keys(results):
    """Numeric result keys present in any row, table order."""
    found = []
    for row in results:
        for k, v in row.items():
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in found:
                found.append(k)
    return [k for k in METRIC_ORDER if k in found] + [k for k in found if k not in METRIC_ORDER]


def point_rows(points, results, files, swept, folder_out):
    """One dict per point: name, swept settings, seed, baseline flag, sample count, metrics, file.

    ``results`` maps point name -> evaluator row, ``files`` point name -> samples file."""
    metrics = metric_keys(list(results.values()))
    rows = []
    for p in points:
        row = {"point": p.name}
        for key in swept:
            row[key] = format_value(p.settings.get(key))
        if "seed" not in swept:
            row["seed"] = p.args.seed
        row["baseline"] = p.baseline
        result = results.get(p.name, {})
        row["num_samples"] = result.get("num_samples", p.args.num_samples)
        row.update(derive(p.args))  # e.g. nfe: UNet passes per image
        for m in metrics:
            row[m] = result.get(m)
        row["samples"] = os.path.relpath(files[p.name], folder_out)
        rows.append(row)
    return rows, metrics


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([{k: ("" if v is None else v) for k, v in r.items()} for r in rows])
    return out.getvalue()


def _cell(value):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows, metrics, swept, caption):
    keys = list(swept) + (["seed"] if "seed" not in swept else []) + [k for k in DERIVED if k in rows[0]]
    head = keys + [METRIC_NAMES.get(m, m) for m in metrics]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r[k]) for k in keys] + [_cell(r[m]) for m in metrics]
        if r["baseline"]:
            cells[0] += " (baseline)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(out, rows, metrics, swept, meta, points_json):
    """sweep.csv, sweep.json and sweep.md in ``out``; returns their paths."""
    paths = [os.path.join(out, name) for name in ("sweep.csv", "sweep.json", "sweep.md")]
    durable.write_text(paths[0], csv_text(rows))
    doc = dict(meta, swept=list(swept), metrics=metrics, points=points_json)
    durable.write_text(paths[1], json.dumps(doc, indent=2, default=str) + "\n")
    caption = (f"Sweep of {meta['script']} ({meta['model']}), {meta['num_samples']} samples per point, "
               f"evaluated against `{meta['reference']}` ({meta['features']} features)."
               + (f" Baseline: {', '.join(meta['baseline_flags'])}." if meta.get("baseline") else ""))
    durable.write_text(paths[2], markdown_table(rows, metrics, swept, caption))
    return paths
