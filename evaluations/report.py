"""Summary table and --report out.json|out.csv for many sample files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import EvalError

COLUMNS = (
    ("inception_score", "IS"),
    ("fid", "FID"),
    ("sfid", "sFID"),
    ("precision", "Precision"),
    ("recall", "Recall"),
)


def format_table(rows: list) -> str:
    names = [str(r["sample"]) for r in rows]
    columns = COLUMNS + ((("accuracy", "Accuracy"),) if any("accuracy" in r for r in rows) else ())
    w = max([len("sample")] + [len(n) for n in names])
    head = "sample".ljust(w) + "".join(f"  {label:>12}" for _, label in columns)
    lines = [head, "-" * len(head)]
    for name, r in zip(names, rows):
        cells = (f"  {r[k]:12.6g}" if k in r else f"  {'-':>12}" for k, _ in columns)
        lines.append(name.ljust(w) + "".join(cells))
    return "\n".join(lines)


def write_report(path, rows: list, meta: dict):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    elif path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        raise EvalError(f"--report must end in .json or .csv, got {path}")
