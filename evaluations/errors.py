"""The one error type the CLI turns into a single line + non-zero exit."""


class EvalError(Exception):
    """User-facing evaluator error (bad input file, missing weights, ...)."""
