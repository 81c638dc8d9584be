"""Train a diffusion model on images (OpenAI's ``image_train.py`` flags).

    OPENAI_LOGDIR=runs/mymodel python scripts/image_train.py --data_dir datasets/digits32.npz \
        $MODEL_FLAGS $DIFFUSION_FLAGS --batch_size 64 --lr 2e-4
    mpiexec -n 2 python scripts/image_train.py ...        # data-parallel

``--data_dir`` is an image folder or an ``.npz`` (``arr_0`` uint8 NHWC, ``arr_1`` labels).
Additions to OpenAI's flags: ``--log_dir`` (default ``$OPENAI_LOGDIR`` or a temp folder),
``--seed`` (exactly reproducible and resumable runs; -1 = unseeded) and ``--random_flip``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
)
from guided_diffusion.train_util import InputError, TrainLoop, open_data, run_main  # noqa: E402


def main(argv=None):
    args = create_argparser().parse_args(argv)
    data = open_data(args, class_cond=args.class_cond)
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    logger.log(f"args: {vars(args)}")
    if args.seed >= 0:
        import torch

        torch.manual_seed(args.seed)
    logger.log("creating model and diffusion...")
    try:
        model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    except ValueError as e:  # e.g. an image size without default channel multipliers
        raise InputError(str(e)) from None
    model.to(dist_util.dev())
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)
    logger.log("training...")
    TrainLoop(
        model=model, diffusion=diffusion, data=data, batch_size=args.batch_size,
        microbatch=args.microbatch, lr=args.lr, ema_rate=args.ema_rate,
        log_interval=args.log_interval, save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint, use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth, schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay, lr_anneal_steps=args.lr_anneal_steps,
        seed=args.seed if args.seed >= 0 else None,
    ).run_loop()


def create_argparser():
    defaults = dict(
        data_dir="", schedule_sampler="uniform", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
        batch_size=1, microbatch=-1, ema_rate="0.9999", log_interval=10, save_interval=10000,
        resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3,
        log_dir="", seed=0, random_flip=True,
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description="Train a diffusion model (OpenAI flags).")
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
