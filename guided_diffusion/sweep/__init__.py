"""Parameter sweeps over the sampling scripts (``scripts/sweep.py``).

grid: the grid syntax (``--grid key=v1,v2`` and YAML/JSON files) expanded into points;
plan: points turned into validated sampling command lines and output directories;
execute: sampling the points (resumable) and one evaluator run over them;
report: sweep.csv / sweep.json / sweep.md;  plots: metric figures and the sample sheet.
"""
