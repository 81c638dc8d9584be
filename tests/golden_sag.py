"""Loading golden cases (vectors made by the original SAG / PAG / SEG code) for the tests."""

import json

import numpy as np
import torch as th

from guided_diffusion.script_util import create_model_and_diffusion


class GoldenCase:
    """One ``.npz`` case of ``golden/<family>``: inputs ``in__*``, expected ``out__*``, ``meta_json``.

    The PAG and SEG cases share the tiny UNet's weights, ``golden/pag/weights_unet_tiny.npz``.
    """

    def __init__(self, golden_dir, name, family="sag"):
        self.dir = golden_dir / family
        self.data = np.load(self.dir / f"{name}.npz")
        self.meta = json.loads(str(self.data["meta_json"]))
        self.weights = (self.dir / self.meta["weights"] if "weights" in self.meta
                        else golden_dir / "pag" / "weights_unet_tiny.npz")

    def input(self, name):
        return th.from_numpy(np.array(self.data[f"in__{name}"]))

    def has_input(self, name):
        return f"in__{name}" in self.data.files

    def expected(self, name):
        return np.array(self.data[f"out__{name}"])

    def build(self, **overrides):
        """The case's model (golden weights, eval mode) and diffusion."""
        flags = dict(self.meta["model_flags"])
        flags.setdefault("timestep_respacing", self.meta.get("diffusion", {}).get("timestep_respacing", ""))
        flags.update(overrides)
        model, diffusion = create_model_and_diffusion(**flags)
        weights = np.load(self.weights)
        model.load_state_dict({k: th.from_numpy(np.array(weights[k])) for k in weights.files}, strict=True)
        model.eval()
        return model, diffusion

    def model_kwargs(self):
        return {"y": self.input("y")} if self.has_input("y") else {}
