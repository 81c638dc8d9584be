#!/usr/bin/env bash
# ImageNet 256x256, unconditional, SEG, DDIM 25 steps.
# SEG has no published ADM run: official defaults (seg_scale 3 = --guide_scale 4.0, the mean
# query = --seg_blur_sigma inf, the middle block) on every step, sampled like the PAG presets.
# Usage: bash configs/imagenet256_uncond_seg_ddim25.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet256_uncond_seg_ddim25.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True --class_cond False"
# The guidance flags (the variable keeps its name for run_preset), with the run's output folder.
SAG_FLAGS='--guide_scale 4.0 --guidance_strategies {"seg":[25,0]} --seg_layers middle_block.1 --seg_blur_sigma inf --gpu_offset 0 --results_root_dir RESULTS --results_dir uncond_seg_ddim25 --seed 0 --save_png True'
CLASSIFIER_FLAGS=""
SAMPLE_FLAGS="--batch_size 5 --num_samples 5000 --timestep_respacing ddim25 --use_ddim True --classifier_guidance False --classifier_scale 0.0"
MODEL_PATH="models/256x256_diffusion_uncond.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
