"""Export a training checkpoint (e.g. an EMA ``ema_0.995_003000.pt``) as a float32 model file.

``--keep_classes N`` keeps only the first N classes: rows of a UNet's label embedding
(``label_emb.weight``) and of a classifier's final projection (the ``out.*`` tensors whose first
dimension is the class count). Our digits models were trained with OpenAI's 1000-class layout
on labels 0..9; keeping 10 classes is exact for the label embedding and for the classifier's
logits of those classes (only the softmax normaliser loses the 990 never-seen classes).

    python scripts/export_checkpoint.py runs/x/ema_0.995_003000.pt models/digits32_diffusion.pt --keep_classes 10
"""

import argparse
import os
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import durable  # noqa: E402


def export(state, keep_classes=0):
    """float32 copy of ``state``; with ``keep_classes`` the per-class rows are cut to that many."""
    if "label_emb.weight" in state:  # a class-conditional UNet
        class_rows = {"label_emb.weight"}
    elif any(k.startswith("out.") for k in state):  # a classifier: its head's last layer
        last = [k for k in state if k.startswith("out.") and k.endswith(".weight")][-1][: -len(".weight")]
        class_rows = {f"{last}.weight", f"{last}.bias"}
    else:
        class_rows = set()
    return {
        key: (value[:keep_classes] if keep_classes and key in class_rows else value).float().contiguous().clone()
        for key, value in state.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--keep_classes", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="overwrite an existing target")
    args = parser.parse_args()
    if os.path.exists(args.target) and not args.force:
        sys.exit(f"error: {args.target} exists; pass --force to overwrite it")
    try:
        state = th.load(args.source, map_location="cpu", weights_only=True)
    except Exception as exc:
        sys.exit(f"error: cannot read {args.source}: {type(exc).__name__}: {exc}")
    with durable.atomic_write(args.target) as f:
        th.save(export(state, args.keep_classes), f)
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
