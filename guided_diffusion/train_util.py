"""Diffusion training loop (OpenAI's ``TrainLoop``) and helpers shared with classifier training.

Checkpoints go to ``logger.get_dir()``: ``model{N:06d}.pt``, ``ema_{rate}_{N:06d}.pt`` and
``opt{N:06d}.pt``, where N is the number of optimizer steps taken (OpenAI saved "model000000"
after the first step and repeated a step on resume; here model{N} holds exactly N updates and a
resumed run continues with update N+1). Weights are float32 state_dicts, written atomically.

Exact resume: with ``seed`` set, every step reseeds torch/numpy/random from (seed, rank, step),
and a data stream with ``seek`` (``load_data``'s) is moved to batch N, so a run resumed from
model{N} reproduces the uninterrupted run's losses and weights (uniform schedule sampler and
fp32; the loss-second-moment history and the fp16 loss scale restart, as in OpenAI's code).

Differences from OpenAI's loop: microbatch gradients are averaged, not summed (identical for
one microbatch per batch; Adam is nearly scale-invariant anyway); with world size > 1 the model
is wrapped in DDP on CPU too (gloo); "step" in the logs counts completed updates.
"""

import copy
import functools
import os
import random
import re
import sys
import time
import warnings

import numpy as np
import torch as th
import torch.distributed as dist
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from torch.optim import AdamW

from . import dist_util, durable, logger
from .fp16_util import MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler


class TrainLoop:
    def __init__(self, *, model, diffusion, data, batch_size, microbatch, lr, ema_rate,
                 log_interval, save_interval, resume_checkpoint, use_fp16=False,
                 fp16_scale_growth=1e-3, schedule_sampler=None, weight_decay=0.0,
                 lr_anneal_steps=0, seed=None):
        self.model, self.diffusion, self.data = model, diffusion, data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = ([ema_rate] if isinstance(ema_rate, float)
                         else [float(x) for x in str(ema_rate).split(",") if x.strip()])
        self.log_interval, self.save_interval = log_interval, save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16, self.fp16_scale_growth = use_fp16, fp16_scale_growth
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.weight_decay, self.lr_anneal_steps, self.seed = weight_decay, lr_anneal_steps, seed
        self.step = 0  # steps taken by this process
        self.resume_step = 0
        self.global_batch = batch_size * world_size()

        self._load_and_sync_parameters()
        self.mp_trainer = MixedPrecisionTrainer(model=model, use_fp16=use_fp16,
                                                fp16_scale_growth=fp16_scale_growth)
        self.opt = AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        if self.resume_step:
            self._load_optimizer_state()
            self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        else:
            self.ema_params = [copy.deepcopy(self.mp_trainer.master_params) for _ in self.ema_rate]
        if hasattr(data, "seek"):
            data.seek(self.resume_step)
        self.use_ddp = world_size() > 1
        self.ddp_model = wrap_ddp(model) if self.use_ddp else model

    # -- resume ---------------------------------------------------------------------------------
    def _load_and_sync_parameters(self):
        path = self.resume_checkpoint or find_resume_checkpoint()
        if path:
            self.resume_step = parse_resume_step_from_filename(path)
            logger.log(f"loading model from checkpoint: {path} (step {self.resume_step})...")
            load_weights(self.model, path)
        dist_util.sync_params(self.model.parameters())

    def _load_ema_parameters(self, rate):
        ema_params = copy.deepcopy(self.mp_trainer.master_params)
        path = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
        if path:
            logger.log(f"loading EMA from checkpoint: {path}...")
            sd = {k: v.clone() for k, v in load_checkpoint(path).items()}
            ema_params = self.mp_trainer.state_dict_to_master_params(sd)
        else:
            logger.warn(f"no ema_{rate}_{self.resume_step:06d}.pt beside the checkpoint; "
                        "the EMA restarts from the model weights")
        dist_util.sync_params(ema_params)
        return ema_params

    def _load_optimizer_state(self):
        path = os.path.join(os.path.dirname(self.resume_checkpoint), f"opt{self.resume_step:06d}.pt")
        if os.path.exists(path):
            logger.log(f"loading optimizer state from checkpoint: {path}")
            self.opt.load_state_dict(load_checkpoint(path))
        else:
            logger.warn(f"no {os.path.basename(path)} beside the checkpoint; Adam state restarts")

    # -- loop -----------------------------------------------------------------------------------
    def run_loop(self):
        tic, last = time.time(), 0
        while not self.lr_anneal_steps or self.step + self.resume_step < self.lr_anneal_steps:
            done = self.step + self.resume_step
            if self.seed is not None:
                seed_everything(self.seed, dist_rank(), done)
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            done += 1
            if done % self.log_interval == 0 or self.step == 1:
                loss = logger.getkvs().get("loss", float("nan"))
                logger.dumpkvs()
                sps = (time.time() - tic) / (self.step - last)
                tic, last = time.time(), self.step
                eta = ""
                if self.lr_anneal_steps:
                    eta = f" | eta {(self.lr_anneal_steps - done) * sps / 60:.1f} min"
                logger.log(f"step {done} | loss {loss:.4f} | {sps:.2f} s/step{eta}")
            if done % self.save_interval == 0:
                self.save()
                if os.environ.get("DIFFUSION_TRAINING_TEST", ""):
                    return
        if self.step and (self.step + self.resume_step) % self.save_interval != 0:
            self.save()

    def run_step(self, batch, cond):
        self._anneal_lr()
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            self._update_ema()
        self.log_step()

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        n = batch.shape[0]
        for i in range(0, n, self.microbatch):
            micro = batch[i:i + self.microbatch].to(dist_util.dev())
            micro_cond = {k: v[i:i + self.microbatch].to(dist_util.dev()) for k, v in cond.items()}
            last = i + self.microbatch >= n
            t, weights = self.schedule_sampler.sample(micro.shape[0], dist_util.dev())
            compute = functools.partial(self.diffusion.training_losses, self.ddp_model, micro, t,
                                        model_kwargs=micro_cond)
            if last or not self.use_ddp:
                losses = compute()
            else:
                with self.ddp_model.no_sync():
                    losses = compute()
            if isinstance(self.schedule_sampler, LossAwareSampler):
                self.schedule_sampler.update_with_local_losses(t, losses["loss"].detach())
            loss = (losses["loss"] * weights).mean()
            log_loss_dict(self.diffusion, t, {k: v * weights for k, v in losses.items()})
            self.mp_trainer.backward(loss * (micro.shape[0] / n))

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        if self.lr_anneal_steps:
            set_annealed_lr(self.opt, self.lr, (self.step + self.resume_step) / self.lr_anneal_steps)

    def log_step(self):
        done = self.step + self.resume_step + 1
        logger.logkv("step", done)
        logger.logkv("samples", done * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def save(self):
        done = self.step + self.resume_step
        if dist_rank() == 0:
            d = get_blob_logdir()
            logger.log(f"saving model{done:06d}.pt, EMA and optimizer state to {d}")
            sd = self.mp_trainer.master_params_to_state_dict
            save_atomic(sd(self.mp_trainer.master_params), os.path.join(d, f"model{done:06d}.pt"))
            for rate, params in zip(self.ema_rate, self.ema_params):
                save_atomic(sd(params), os.path.join(d, f"ema_{rate}_{done:06d}.pt"))
            save_atomic(self.opt.state_dict(), os.path.join(d, f"opt{done:06d}.pt"))
        barrier()


# -- helpers ----------------------------------------------------------------------------------------
def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dist_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier():
    dist_util.barrier()


def wrap_ddp(model):
    """DistributedDataParallel with OpenAI's settings (gloo on CPU, one GPU per rank on CUDA)."""
    kw = dict(device_ids=[dist_util.dev()], output_device=dist_util.dev()) if th.cuda.is_available() else {}
    with warnings.catch_warnings():  # torch >= 2.10 deprecates broadcast_buffers
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(model, broadcast_buffers=False, bucket_cap_mb=128, find_unused_parameters=False, **kw)


def seed_everything(seed, rank, step):
    """Seed torch, numpy and random from (seed, rank, step)."""
    s = int(np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(1)[0])
    th.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def set_annealed_lr(opt, base_lr, frac_done):
    for group in opt.param_groups:
        group["lr"] = base_lr * (1 - frac_done)


def parse_resume_step_from_filename(filename):
    """``path/model001000.pt`` -> 1000 (0 if the name holds no step)."""
    m = re.search(r"(\d+)\.pt$", os.path.basename(filename))
    return int(m.group(1)) if m else 0


def get_blob_logdir():
    return logger.get_dir()


def find_resume_checkpoint():
    """Hook for automatic resumption (none by default, as in OpenAI's code)."""
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    if not main_checkpoint:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), f"ema_{rate}_{step:06d}.pt")
    return path if os.path.exists(path) else None


def log_loss_dict(diffusion, ts, losses):
    """Log each loss's mean and its means per timestep quartile (``loss_q0`` .. ``loss_q3``)."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            logger.logkv_mean(f"{key}_q{int(4 * sub_t / diffusion.num_timesteps)}", sub_loss)


class InputError(Exception):
    """Bad user input (missing data, unreadable checkpoint): reported as one line, exit 1."""


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise InputError(f"checkpoint not found: {path}")
    try:
        return dist_util.load_state_dict(path, map_location=dist_util.dev())
    except Exception as e:  # torch raises many kinds for a bad file
        raise InputError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def load_weights(model, path):
    """Strictly load a state_dict file into ``model``; a mismatch is an ``InputError``."""
    sd = load_checkpoint(path)
    if not isinstance(sd, dict):
        raise InputError(f"{path} does not hold a state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise InputError(f"{path} does not match the model flags: {len(missing)} missing keys "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                         f"{len(shapes)} shape mismatches {shapes[:3]}")
    model.load_state_dict(sd)


def open_data(args, class_cond, data_dir=None, **kw):
    """``load_data`` for a script's ``args`` (batch_size, image_size, random_flip, seed); bad
    input becomes an ``InputError``."""
    data_dir = args.data_dir if data_dir is None else data_dir
    from .image_datasets import load_data

    try:
        return load_data(data_dir=data_dir, batch_size=args.batch_size, image_size=args.image_size,
                         class_cond=class_cond, random_flip=args.random_flip,
                         seed=args.seed if args.seed >= 0 else None, **kw)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e) if data_dir else "--data_dir is required") from None


def save_atomic(obj, path):
    """``torch.save`` that leaves either the complete file or none, also after a crash."""
    with durable.atomic_write(path) as f:
        th.save(obj, f)


def run_main(main):
    """Run a script's ``main``; bad input ends with one ``error:`` line and exit status 1."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
