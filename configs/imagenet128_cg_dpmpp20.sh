#!/usr/bin/env bash
# ImageNet 128x128, class-conditional, SAG + classifier guidance, DPM-Solver++(2M) in 20 steps
# (40 UNet passes plus 20 classifier gradients per image instead of 500 + 250): the published
# SAG + CG flags of imagenet128_cg.sh (--guide_start 250 guides every step), sampled on the
# model's full schedule (no --timestep_respacing). FID not measured here.
# Usage: bash configs/imagenet128_cg_dpmpp20.sh [extra flags]   (NPROC=8: mpiexec -n 8)
#        source configs/imagenet128_cg_dpmpp20.sh               (only exports the variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 250 --sel_attn_block output --sel_attn_depth 8 --blur_sigma 3 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 0.5 --classifier_path models/128x128_classifier.pt"
SAMPLE_FLAGS="--batch_size 64 --num_samples 10000 --sampler dpm++ --sampler_steps 20 --solver_order 2"
MODEL_PATH="models/128x128_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
