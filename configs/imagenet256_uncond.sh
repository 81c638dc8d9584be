#!/usr/bin/env bash
# ImageNet 256x256, unconditional, SAG only (classifier loaded, unused).
# Published command line (SAG README / shared/spec/CLI.md). The README names the checkpoint
# models/256x256_diffusion.pt; OpenAI ships the unconditional one as 256x256_diffusion_uncond.pt
# (pass --model_path models/256x256_diffusion_uncond.pt if that is your file name).
# Usage: bash configs/imagenet256_uncond.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet256_uncond.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 9 --classifier_guidance False"
CLASSIFIER_FLAGS="--classifier_scale 0.0 --classifier_path models/256x256_classifier.pt"
SAMPLE_FLAGS="--batch_size 16 --num_samples 10000 --timestep_respacing 250"
MODEL_PATH="models/256x256_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
