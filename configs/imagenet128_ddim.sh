#!/usr/bin/env bash
# ImageNet 128x128, class-conditional, DDIM 25 steps, SAG + classifier guidance.
# SAG flags from the original README's DDIM preset (shared/spec/SAG.md section 3).
# Usage: bash configs/imagenet128_ddim.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet128_ddim.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 --num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.1 --guide_start 25 --sel_attn_block output --sel_attn_depth 8 --blur_sigma 3 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 1.0 --classifier_path models/128x128_classifier.pt --classifier_use_fp16 True"
SAMPLE_FLAGS="--batch_size 64 --num_samples 10000 --timestep_respacing ddim25 --use_ddim True"
MODEL_PATH="models/128x128_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
