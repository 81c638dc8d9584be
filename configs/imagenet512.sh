#!/usr/bin/env bash
# ImageNet 512x512, class-conditional, classifier guidance scale 4.0 (OpenAI); SAG flags are the defaults - not published for this model.
# Model and classifier settings from OpenAI guided-diffusion (512 is published with --use_fp16 False).
# Usage: bash configs/imagenet512.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet512.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 False --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 4.0 --classifier_path models/512x512_classifier.pt"
SAMPLE_FLAGS="--batch_size 4 --num_samples 10000 --timestep_respacing 250"
MODEL_PATH="models/512x512_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
