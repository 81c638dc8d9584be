"""Train a (noised) classifier for classifier guidance (OpenAI's ``classifier_train.py`` flags).

    OPENAI_LOGDIR=runs/clf python scripts/classifier_train.py --data_dir datasets/digits32.npz \
        --image_size 32 --classifier_width 32 --noised True --iterations 2000 --batch_size 64

With ``--noised True`` each batch is replaced by ``q_sample(x, t)`` with t from
``--schedule_sampler`` and the classifier sees t. Logs ``train_loss``, ``train_acc@1``,
``train_acc@5`` (and ``val_*`` every ``--eval_interval`` steps with ``--val_data_dir``), each also
per timestep quartile. Saves ``model{N:06d}.pt``/``opt{N:06d}.pt`` (N = updates done) every
``--save_interval`` steps and at the end; ``--resume_checkpoint .../model{N}.pt`` continues
exactly (same ``--seed``). Extra flags as in ``image_train.py``: ``--log_dir``, ``--seed``,
``--random_flip``.
"""

import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

import torch as th  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.optim import AdamW  # noqa: E402

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.fp16_util import MixedPrecisionTrainer  # noqa: E402
from guided_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import (  # noqa: E402
    InputError, load_checkpoint, load_weights, log_loss_dict, open_data, parse_resume_step_from_filename, run_main,
    save_atomic, seed_everything, set_annealed_lr, world_size, wrap_ddp, dist_rank, barrier,
)


def main(argv=None):
    args = create_argparser().parse_args(argv)
    data = open_data(args, class_cond=True, random_crop=True)
    val_data = open_data(args, class_cond=True, data_dir=args.val_data_dir) if args.val_data_dir else None
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    logger.log(f"args: {vars(args)}")
    if args.seed >= 0:
        th.manual_seed(args.seed)
    logger.log("creating model and diffusion...")
    try:
        model, diffusion = create_classifier_and_diffusion(
            **args_to_dict(args, classifier_and_diffusion_defaults().keys()))
    except ValueError as e:  # e.g. an image size without default channel multipliers
        raise InputError(str(e)) from None
    model.to(dist_util.dev())
    sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion) if args.noised else None

    resume_step = 0
    if args.resume_checkpoint:
        resume_step = parse_resume_step_from_filename(args.resume_checkpoint)
        logger.log(f"loading model from checkpoint: {args.resume_checkpoint} (step {resume_step})")
        load_weights(model, args.resume_checkpoint)
    dist_util.sync_params(model.parameters())
    mp_trainer = MixedPrecisionTrainer(model=model, use_fp16=args.classifier_use_fp16,
                                       initial_lg_loss_scale=16.0)
    ddp_model = wrap_ddp(model) if world_size() > 1 else model
    opt = AdamW(mp_trainer.master_params, lr=args.lr, weight_decay=args.weight_decay)
    if args.resume_checkpoint:
        opt_path = os.path.join(os.path.dirname(args.resume_checkpoint), f"opt{resume_step:06d}.pt")
        if os.path.exists(opt_path):
            logger.log(f"loading optimizer state from checkpoint: {opt_path}")
            opt.load_state_dict(load_checkpoint(opt_path))
        else:
            logger.warn(f"no {opt_path}; Adam state restarts")
    data.seek(resume_step)
    if val_data is not None:
        val_data.seek(resume_step // args.eval_interval)

    def forward_backward_log(data_loader, prefix="train"):
        batch, extra = next(data_loader)
        labels = extra["y"].to(dist_util.dev())
        batch = batch.to(dist_util.dev())
        if args.noised:
            t, _ = sampler.sample(batch.shape[0], dist_util.dev())
            batch = diffusion.q_sample(batch, t)
        else:
            t = th.zeros(batch.shape[0], dtype=th.long, device=dist_util.dev())
        for i, (sub_batch, sub_labels, sub_t) in enumerate(split_microbatches(args.microbatch, batch, labels, t)):
            logits = ddp_model(sub_batch, timesteps=sub_t)
            loss = F.cross_entropy(logits, sub_labels, reduction="none")
            log_loss_dict(diffusion, sub_t, {
                f"{prefix}_loss": loss.detach(),
                f"{prefix}_acc@1": compute_top_k(logits, sub_labels, k=1, reduction="none"),
                f"{prefix}_acc@5": compute_top_k(logits, sub_labels, k=5, reduction="none"),
            })
            loss = loss.mean()
            if loss.requires_grad:
                if i == 0:
                    mp_trainer.zero_grad()
                mp_trainer.backward(loss * len(sub_batch) / len(batch))

    logger.log("training classifier model...")
    done, tic, last = resume_step, time.time(), resume_step
    while done < args.iterations:
        if args.seed >= 0:
            seed_everything(args.seed, dist_rank(), done)
        logger.logkv("step", done + 1)
        logger.logkv("samples", (done + 1) * args.batch_size * world_size())
        if args.anneal_lr:
            set_annealed_lr(opt, args.lr, done / args.iterations)
        forward_backward_log(data)
        mp_trainer.optimize(opt)
        done += 1
        if val_data is not None and done % args.eval_interval == 0:
            with th.no_grad(), (ddp_model.no_sync() if ddp_model is not model else contextlib.nullcontext()):
                model.eval()
                forward_backward_log(val_data, prefix="val")
                model.train()
        if done % args.log_interval == 0 or done == resume_step + 1:
            kvs = dict(logger.getkvs())
            logger.dumpkvs()
            sps = (time.time() - tic) / (done - last)
            tic, last = time.time(), done
            logger.log(f"step {done} | train_loss {kvs.get('train_loss', float('nan')):.4f} | "
                       f"train_acc@1 {kvs.get('train_acc@1', float('nan')):.3f} | {sps:.2f} s/step | "
                       f"eta {(args.iterations - done) * sps / 60:.1f} min")
        if done % args.save_interval == 0 or done == args.iterations:
            save_model(mp_trainer, opt, done)
    barrier()


def save_model(mp_trainer, opt, step):
    if dist_rank() == 0:
        logger.log(f"saving model{step:06d}.pt and opt{step:06d}.pt to {logger.get_dir()}")
        save_atomic(mp_trainer.master_params_to_state_dict(mp_trainer.master_params),
                    os.path.join(logger.get_dir(), f"model{step:06d}.pt"))
        save_atomic(opt.state_dict(), os.path.join(logger.get_dir(), f"opt{step:06d}.pt"))


def compute_top_k(logits, labels, k, reduction="mean"):
    """Top-k accuracy per sample (``reduction="none"``) or its mean."""
    _, top_ks = th.topk(logits, min(k, logits.shape[-1]), dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    return hits.mean().item() if reduction == "mean" else hits


def split_microbatches(microbatch, *args):
    bs = len(args[0])
    if microbatch == -1 or microbatch >= bs:
        yield tuple(args)
    else:
        for i in range(0, bs, microbatch):
            yield tuple(x[i:i + microbatch] if x is not None else None for x in args)


def create_argparser():
    defaults = dict(
        data_dir="", val_data_dir="", noised=True, iterations=150000, lr=3e-4, weight_decay=0.0,
        anneal_lr=False, batch_size=4, microbatch=-1, schedule_sampler="uniform",
        resume_checkpoint="", log_interval=10, eval_interval=5, save_interval=10000,
        log_dir="", seed=0, random_flip=True,
    )
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description="Train a noised classifier (OpenAI flags).")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
