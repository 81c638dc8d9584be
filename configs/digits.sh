#!/usr/bin/env bash
# Bundled digits model (32x32, class-conditional) with its noisy classifier: a CPU-sized smoke run.
# Flags as trained (see models/README.md). SAG: scale 1.5 on the 8x8 attention of output block 2,
# blur sigma 3 (sigma 9 wipes a 32x32 digit out inside the mask); DDPM 50 steps.
# PAG and SEG (PAG_FLAGS, SEG_FLAGS): the published scale 4.0 (= paper 3, SEG's official 3), every
# step (window [999, 0]), on the blocks at PAG's published positions mapped to this model's grids
# (last 16x16 and both 8x8 encoder blocks, middle block); SEG's own default, the middle block
# alone, hardly changes this model (models/README.md, "PAG and SEG on the digits model").
# Usage: bash configs/digits.sh [extra flags]   (NPROC=2 to run under mpiexec -n 2)
#        GUIDANCE=pag|seg bash configs/digits.sh [extra flags]   (PAG / SEG instead of SAG)
#        source configs/digits.sh               (only exports the flag variables)

MODEL_FLAGS="--image_size 32 --num_channels 32 --num_res_blocks 2 --channel_mult 1,1,2 --attention_resolutions 16,8 --num_heads 4 --class_cond True --num_classes 10 --learn_sigma True --diffusion_steps 1000 --noise_schedule cosine --resblock_updown False --use_scale_shift_norm True --dropout 0.0"
SAG_FLAGS="--guide_scale 1.5 --guide_start 250 --sel_attn_block output --sel_attn_depth 2 --blur_sigma 3 --classifier_guidance True"
CLASSIFIER_FLAGS="--classifier_scale 1.0 --classifier_path models/digits32_classifier.pt --classifier_width 32 --classifier_depth 2 --classifier_attention_resolutions 16,8 --classifier_pool attention"
SAMPLE_FLAGS="--batch_size 24 --num_samples 48 --timestep_respacing 50 --save_grid True"
MODEL_PATH="models/digits32_diffusion.pt"
PAG_FLAGS='--guide_scale 4.0 --guidance_strategies {"attention_mask_identity":[999,0]} --drop_layers input_blocks.5.1 input_blocks.7.1 input_blocks.8.1 middle_block.1 --classifier_guidance True'
SEG_FLAGS='--guide_scale 4.0 --guidance_strategies {"seg":[999,0]} --seg_layers input_blocks.5.1 input_blocks.7.1 input_blocks.8.1 middle_block.1 --seg_blur_sigma inf --classifier_guidance True'
case "${GUIDANCE:-sag}" in  # the guidance flags of the run (run_preset passes SAG_FLAGS)
    sag) ;;
    pag) SAG_FLAGS=$PAG_FLAGS ;;
    seg) SAG_FLAGS=$SEG_FLAGS ;;
    *) echo "configs/digits.sh: GUIDANCE must be sag, pag or seg, got '$GUIDANCE'" >&2; return 2 2>/dev/null || exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/_run.sh"
run_preset classifier_sample.py "$@"
