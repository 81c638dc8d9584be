#!/usr/bin/env bash
# ImageNet 256x256, unconditional, SAG only, DPM-Solver++(2M) in 20 steps (40 UNet passes per
# image instead of the published 500): the published SAG flags of imagenet256_uncond.sh
# (--guide_start 250 guides every step), sampled on the model's full schedule (no
# --timestep_respacing). FID not measured here.
# Usage: bash configs/imagenet256_uncond_dpmpp20.sh [extra flags]   (NPROC=8: mpiexec -n 8)
#        source configs/imagenet256_uncond_dpmpp20.sh               (only exports the variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
CLASSIFIER_FLAGS="--classifier_scale 0.0 --classifier_path models/256x256_classifier.pt"
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --sampler dpm++ --sampler_steps 20 --solver_order 2"
MODEL_PATH="models/256x256_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
