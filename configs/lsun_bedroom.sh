#!/usr/bin/env bash
# LSUN Bedroom 256x256 (OpenAI's model flags); SAG flags are the defaults - not published for this model.
# Model flags as OpenAI publishes them for LSUN; no SAG result was published.
# Usage: bash configs/lsun_bedroom.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/lsun_bedroom.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --dropout 0.1 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
CLASSIFIER_FLAGS=""
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250"
MODEL_PATH="models/lsun_bedroom.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset image_sample.py "$@"
