"""Make the diffusers reference trajectories in this folder (needs diffusers, which the project
does not depend on; made with diffusers 0.42.1):

    PYTHONPATH=.:tests:<diffusers install> python tests/reference/diffusers/make_reference.py

* ``analytic.npz``: DPMSolverMultistepScheduler and UniPCMultistepScheduler over many settings,
  driven by ``tests/solver_helpers.analytic_eps`` from ``in__noise``;
* ``unipc_unet.npz``: UniPCMultistepScheduler with its default settings (order 2, bh2,
  corrector on every step, linspace, zero terminal), 10 steps, on the tiny golden UNet from the
  solver goldens' noise and labels, with and without the [-1, 1] clamp (``thresholding=True,
  sample_max_value=1.0``, ADM's clip_denoised).
"""

import itertools
import json
from pathlib import Path

import numpy as np
import torch as th
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

import diffusers
from reference_paths import BUNDLED
from solver_helpers import analytic_eps, golden_unet

HERE = Path(__file__).resolve().parent
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def scheduler(case):
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  beta_schedule=BETA_SCHEDULES[case["schedule"]], prediction_type="epsilon",
                  solver_order=case["order"], solver_type=case["solver_type"], lower_order_final=True,
                  final_sigmas_type=case["final"], timestep_spacing=case.get("spacing", "linspace"),
                  steps_offset=0, thresholding=case["clip"], sample_max_value=1.0)
    if case["sampler"] == "dpm++":
        lam_min = -5.1 if case["schedule"] == "cosine" else -float("inf")
        sch = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", euler_at_final=False,
                                          lambda_min_clipped=lam_min, **common)
    else:
        sch = UniPCMultistepScheduler(predict_x0=True, disable_corrector=[], **common)
    if isinstance(case.get("spacing"), list):
        sch.set_timesteps(timesteps=case["spacing"])
    else:
        sch.set_timesteps(case["steps"])
    return sch


def trajectory(case, x, eps_fn):
    sch = scheduler(case)
    timesteps, samples = [], []
    for t in sch.timesteps:
        x = sch.step(eps_fn(x, th.full((x.shape[0],), int(t), dtype=th.long)), t, x).prev_sample
        timesteps.append(int(t))
        samples.append(x.numpy().copy())
    return np.array(timesteps, dtype=np.int64), np.stack(samples)


def analytic_cases():
    cases = []
    for order, stype, final, steps, clip in itertools.product(
            (1, 2, 3), ("bh2", "bh1"), ("zero", "sigma_min"), (4, 11), (False, True)):
        cases.append(dict(sampler="unipc", schedule="linear", order=order, solver_type=stype, final=final,
                          steps=steps, clip=clip))
    for order, stype, final, steps, clip in itertools.product(
            (1, 2, 3), ("midpoint", "heun"), ("zero", "sigma_min"), (4, 16), (False, True)):
        cases.append(dict(sampler="dpm++", schedule="linear", order=order, solver_type=stype, final=final,
                          steps=steps, clip=clip))
    for sampler, stype in (("unipc", "bh2"), ("dpm++", "midpoint")):
        base = dict(sampler=sampler, schedule="linear", order=2, solver_type=stype, final="zero", clip=False)
        cases += [dict(base, spacing="leading", steps=11), dict(base, spacing="trailing", steps=11),
                  dict(base, steps=1), dict(base, steps=2),
                  dict(base, schedule="cosine", steps=11, clip=True),
                  dict(base, schedule="cosine", order=3, steps=11, clip=True)]
    cases.append(dict(sampler="dpm++", schedule="linear", order=3, solver_type="midpoint", final="zero",
                      clip=False, spacing=[999, 850, 700, 520, 400, 333, 120, 37]))
    return cases


def main():
    versions = {"diffusers": diffusers.__version__, "torch": th.__version__, "numpy": np.__version__}
    noise = th.randn(2, 3, 4, 4, generator=th.Generator().manual_seed(0))
    arrays, cases = {"in__noise": noise.numpy()}, analytic_cases()
    for i, case in enumerate(cases):
        arrays[f"out__{i}__timesteps"], arrays[f"out__{i}__samples"] = trajectory(case, noise.clone(), analytic_eps)
    meta = dict(cases=cases, versions=versions,
                what="per case i: the raw model timesteps and the sample after each step, from in__noise")
    np.savez_compressed(HERE / "analytic.npz", meta_json=np.array(json.dumps(meta)), **arrays)

    golden = np.load(BUNDLED / "golden" / "solvers" / "diffusers_dpmpp2m_10.npz")
    flags = json.loads(str(golden["meta_json"]))["eps_fn"]["model_flags"]
    model, _ = golden_unet(flags)
    noise, y = th.from_numpy(golden["in__noise"]), th.from_numpy(golden["in__y"])

    def unet_eps(x, t):
        with th.no_grad():
            return model(x, t, y)[:, :3]

    arrays = {"in__noise": noise.numpy(), "in__y": y.numpy()}
    cases = [dict(sampler="unipc", schedule="linear", order=2, solver_type="bh2", final="zero", steps=10, clip=clip)
             for clip in (False, True)]
    for i, case in enumerate(cases):
        arrays[f"out__{i}__timesteps"], arrays[f"out__{i}__samples"] = trajectory(case, noise.clone(), unet_eps)
    meta = dict(cases=cases, versions=versions, model_flags=flags, weights="../golden/pag/weights_unet_tiny.npz",
                what="UNet(x, t, y)[:, :3] as eps; per case the timesteps and the sample after each step")
    np.savez_compressed(HERE / "unipc_unet.npz", meta_json=np.array(json.dumps(meta)), **arrays)


if __name__ == "__main__":
    th.set_num_threads(1)
    main()
