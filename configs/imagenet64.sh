#!/usr/bin/env bash
# ImageNet 64x64, class-conditional (OpenAI's 64x64 model flags); SAG flags are the defaults - not published for this model.
# Model flags from OpenAI guided-diffusion; depths 0-2, 4, 5, 8 work with the original's hard-coded map size (SAG.md quirk 3), our probe accepts every attention block.
# Usage: bash configs/imagenet64.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet64.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
CLASSIFIER_FLAGS=""
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250"
MODEL_PATH="models/64x64_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset image_sample.py "$@"
