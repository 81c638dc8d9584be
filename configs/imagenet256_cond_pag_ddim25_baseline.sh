#!/usr/bin/env bash
# ImageNet 256x256, class-conditional, DDIM 25 steps, the PAG repository's baseline (guide scale
# 1.0: plain sampling, one UNet pass per step).
# Flags of the PAG repository's run/sample_cond_ddim25_baseline.sh (its --gpu 0 is --gpu_offset 0 here: the
# same device for one process, one device per rank under mpiexec).
# Usage: bash configs/imagenet256_cond_pag_ddim25_baseline.sh [extra flags]   (NPROC=8 to run under mpiexec -n 8)
#        source configs/imagenet256_cond_pag_ddim25_baseline.sh               (only exports the flag variables)

MODEL_FLAGS="--attention_resolutions 32,16,8 --diffusion_steps 1000 --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True --class_cond True"
# The guidance flags (the variable keeps its name for run_preset), with the run's output folder.
SAG_FLAGS='--guide_scale 1.0 --guidance_strategies {"attention_mask_identity":[25,0]} --drop_layers input_blocks.14.1 input_blocks.16.1 input_blocks.17.1 middle_block.1 --gpu_offset 0 --results_root_dir RESULTS --results_dir cond_pag_ddim25_baseline --seed 0 --save_png True'
CLASSIFIER_FLAGS="--classifier_path models/256x256_classifier.pt"
SAMPLE_FLAGS="--batch_size 5 --num_samples 5000 --timestep_respacing ddim25 --use_ddim True --classifier_guidance False --classifier_scale 0.0"
MODEL_PATH="models/256x256_diffusion.pt"

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
