"""The grid of a sweep: which settings each point gets.

Two ways to write it:

* ``--grid key=v1,v2`` (repeatable): the product of all such axes, in the given order. Values are
  split at commas outside brackets, braces and quotes, so JSON values (``{"a": [1, 2]}``) and
  quoted values with commas (``"16,8"``) stay whole.
* a YAML or JSON file (``--grid_file``) describing a tree of nodes:

  - ``{key: [v1, v2], key2: [...]}``: the product of these axes (a scalar is a one-value axis);
  - ``{key: {v1: NODE, v2: NODE}}``: nested axes, each value of ``key`` with its own sub-grid
    (``null`` for none);
  - ``[NODE, NODE, ...]`` or ``{product: [...]}``: the product of the nodes;
  - ``{zip: {key: [...], key2: [...]}}`` or ``{zip: [NODE, ...]}``: varied together (equal lengths);
  - ``{union: [NODE, ...]}``: the points of every node, one after the other.

A point is an ordered ``{key: value}`` dict; values are what was written (strings from the
command line, YAML scalars, lists or mappings from a file); turning them into command-line
tokens is the planner's job (it knows each flag's arity).
"""

import json
import shlex

SPECIAL = ("product", "zip", "union")


class GridError(ValueError):
    """A malformed grid (reported as one line)."""


# ----------------------------------------------------------------------------- --grid key=v1,v2


def split_values(text):
    """Split at top-level commas (outside ``[]{}()`` and quotes); strip quotes around a value."""
    values, current, depth, quote = [], [], 0, None
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch in "[{(":
            depth += 1
            current.append(ch)
        elif ch in "]})":
            depth -= 1
            current.append(ch)
        elif ch == "," and depth == 0:
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote or depth:
        raise GridError(f"unbalanced quotes or brackets in {text!r}")
    values.append("".join(current))
    out = []
    for value in values:
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out.append(value)
    return out


def parse_cli_axis(text):
    """``key=v1,v2`` -> ``("key", ["v1", "v2"])``."""
    key, sep, values = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise GridError(f"--grid {text!r}: expected key=value1,value2,... (e.g. guide_scale=1.0,1.5)")
    if not values.strip():
        raise GridError(f"--grid {text!r}: no values for {key}")
    parts = split_values(values)
    if any(p == "" for p in parts):
        raise GridError(f"--grid {text!r}: an empty value (two commas in a row or a trailing comma)")
    return key, parts


def cli_grid(axes):
    """The product of ``--grid`` axes as a node (see ``expand``)."""
    node = []
    for text in axes:
        key, values = parse_cli_axis(text)
        node.append({key: values})
    return node


# ----------------------------------------------------------------------------- files


def load_grid_file(path):
    """Read a YAML or JSON grid file; returns ``(grid node, base flags)``.

    The file is either a grid node, or a mapping ``{grid: NODE, base: "--flag value ..."}`` whose
    ``base`` flags (a string or a list of tokens) extend the base command (flags after ``--`` on
    the command line come later and win)."""
    import yaml

    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise GridError(f"cannot read grid file {path}: {exc.strerror}")
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GridError(f"grid file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}")
    base = []
    if isinstance(data, dict) and "grid" in data:
        unknown = sorted(set(data) - {"grid", "base"})
        if unknown:
            raise GridError(f"grid file {path}: unknown top-level key '{unknown[0]}' (a sweep file has grid and base)")
        base = data.get("base") or []
        base = shlex.split(base) if isinstance(base, str) else [str(token) for token in base]
        data = data["grid"]
    if data is None or data == [] or data == {}:
        raise GridError(f"grid file {path} has an empty grid")
    return data, base


# ----------------------------------------------------------------------------- expansion


def expand(node, where="grid"):
    """All points of a grid node, in order (see the module docstring for the node forms)."""
    if isinstance(node, list):
        return _product([expand(child, f"{where}[{i}]") for i, child in enumerate(node)], where)
    if not isinstance(node, dict):
        raise GridError(f"{where}: expected a mapping of flags to values or a list of such, got {node!r}")
    if not node:
        raise GridError(f"{where}: empty mapping")
    special = [k for k in node if k in SPECIAL]
    if special and len(node) > 1:
        raise GridError(f"{where}: '{special[0]}' must be the only key of its mapping")
    if special:
        kind = special[0]
        body = node[kind]
        if kind == "zip":
            return _zip(body, f"{where}.zip")
        if not isinstance(body, list) or not body:
            raise GridError(f"{where}.{kind}: expected a non-empty list of sub-grids")
        parts = [expand(child, f"{where}.{kind}[{i}]") for i, child in enumerate(body)]
        if kind == "product":
            return _product(parts, where)
        return [point for part in parts for point in part]
    return _product([_axis(key, values, where) for key, values in node.items()], where)


def _axis(key, values, where):
    key = str(key).lstrip("-")
    if isinstance(values, dict):  # nested: each value with its own sub-grid
        if not values:
            raise GridError(f"{where}.{key}: no values")
        points = []
        for value, sub in values.items():
            head = {key: value}
            if sub is None:
                points.append(head)
            else:
                points.extend(_merge(head, tail, where) for tail in expand(sub, f"{where}.{key}.{value}"))
        return points
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise GridError(f"{where}.{key}: no values (empty list)")
    return [{key: value} for value in values]


def _zip(body, where):
    if isinstance(body, dict):
        parts = [_axis(key, values, where) for key, values in body.items()]
        names = list(body)
    elif isinstance(body, list):
        parts = [expand(child, f"{where}[{i}]") for i, child in enumerate(body)]
        names = [f"{where}[{i}]" for i in range(len(body))]
    else:
        raise GridError(f"{where}: expected a mapping of flags to equally long lists")
    if not parts:
        raise GridError(f"{where}: nothing to zip")
    lengths = [len(p) for p in parts]
    if len(set(lengths)) > 1:
        detail = ", ".join(f"{n}: {k}" for n, k in zip(names, lengths))
        raise GridError(f"{where}: zipped axes have different lengths ({detail}); give each the same number of values")
    points = []
    for row in zip(*parts):
        point = {}
        for piece in row:
            point = _merge(point, piece, where)
        points.append(point)
    return points


def _product(parts, where):
    points = [{}]
    for part in parts:
        points = [_merge(a, b, where) for a in points for b in part]
    return points


def _merge(a, b, where):
    twice = set(a) & set(b)
    if twice:
        raise GridError(f"{where}: {sorted(twice)[0]} is swept twice in one product/zip; give it one axis")
    return {**a, **b}


def grid_points(cli_axes=(), file_node=None, where="grid file"):
    """The sweep's points from ``--grid`` strings and/or a grid file's node (their product)."""
    nodes = []
    if file_node is not None:
        nodes.append(expand(file_node, where))
    if cli_axes:
        nodes.append(expand(cli_grid(cli_axes), "--grid"))
    if not nodes:
        raise GridError("empty grid: give at least one --grid key=value1,value2 or a --grid_file")
    return _product(nodes, where)
