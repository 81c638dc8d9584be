"""OpenAI-identical IS / FID / sFID / precision / recall in PyTorch (see README.md)."""
