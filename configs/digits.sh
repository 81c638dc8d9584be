#!/usr/bin/env bash
# Bundled digits model (32x32, class-conditional) with its noisy classifier: a CPU-sized smoke run.
# Flags as trained (see models/README.md). SAG: scale 1.5 on the 8x8 attention of output block 2,
# blur sigma 3 (sigma 9 wipes a 32x32 digit out inside the mask); DDPM 50 steps.
# Usage: bash configs/digits.sh [extra flags]   (NPROC=2 to run under mpiexec -n 2)
#        source configs/digits.sh               (only exports the flag variables)

MODEL_FLAGS="--image_size 32 --num_channels 32 --num_res_blocks 2 --channel_mult 1,1,2 --attention_resolutions 16,8 --num_heads 4 --class_cond True --num_classes 10 --learn_sigma True --diffusion_steps 1000 --noise_schedule cosine --resblock_updown False --use_scale_shift_norm True --dropout 0.0"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 3 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 1.0 --classifier_path models/digits32_classifier.pt --classifier_width 32 --classifier_depth 2 --classifier_attention_resolutions 16,8 --classifier_pool attention"
SAMPLE_FLAGS="--batch_size 24 --num_samples 48 --timestep_respacing 50 --save_grid True"
MODEL_PATH="models/digits32_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
