#!/usr/bin/env bash
# Makes the shipped default model, models/sd-rs-anime, from nothing but npm packages and sd-rs:
# render the avatar dataset, train the VAE, train the U-Net and text encoder (six stages), copy
# the result into models/ (f16 weights) and measure how well it follows prompts.
#
# Resumable: run it again after a stop (or in a later session) and every stage continues from
# its last checkpoint; finished stages are skipped. Work goes to $SD_RS_WORK (default
# ~/sd-rs-runs), outside the repository, so a fresh checkout keeps it.
#
#   scripts/train_default_model.sh                 # everything, on the default device
#   SD_RS_DEVICE=cuda:0 scripts/train_default_model.sh
#   SD_RS_BIN=/path/to/sd-rs scripts/train_default_model.sh   # use a prebuilt binary
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${SD_RS_WORK:-$HOME/sd-rs-runs}"
DEVICE="${SD_RS_DEVICE:-auto}"
DATA_V1="$WORK/avatars-v1"
VAE="$WORK/anime-vae"
VAE_FT="$WORK/anime-vae-ft"
MODEL="$WORK/anime"
MODEL_FT="$WORK/anime-ft"
DATA_V2="$WORK/avatars"
MODEL_FT_VAE="$WORK/anime-ft-vae"
MODEL_GLASSES="$WORK/anime-glasses"
MODEL_EYEWEAR="$WORK/anime-eyewear"
MODEL_TAGS="$WORK/anime-tags"
MODEL_WEIGHTED="$WORK/anime-glasses-weighted"
mkdir -p "$WORK"

# The shipped model was trained on the data set as it was rendered until 2026-12-06 (three
# glasses frames; the vocabulary now draws one): --glasses-variants renders exactly that one.
if [ ! -f "$DATA_V1/data.jsonl" ]; then
  echo "== rendering the data set into $DATA_V1"
  (cd scripts/avatars && npm ci --no-audit --no-fund)
  node scripts/avatars/render.mjs --out "$DATA_V1" --count 20000 --seed 0 \
    --glasses-variants variant02,variant04,variant05
fi

# The eyewear stages train on the data set as rendered now ("glasses" is always DiceBear's dark
# frame variant02), once as rendered and once with the eyewear images repeated.
if [ ! -f "$DATA_V2/data-eyewear.jsonl" ]; then
  echo "== rendering the data set into $DATA_V2"
  (cd scripts/avatars && npm ci --no-audit --no-fund)
  node scripts/avatars/render.mjs --out "$DATA_V2" --count 20000 --seed 0
  python3 scripts/balance_captions.py "$DATA_V2" --by glasses --times glasses=2,sunglasses=4 \
    --out "$DATA_V2/data-eyewear.jsonl"
fi
if [ ! -f "$DATA_V2/data-glasses4.jsonl" ]; then
  python3 scripts/balance_captions.py "$DATA_V2" --by glasses --times glasses=4,sunglasses=2 \
    --out "$DATA_V2/data-glasses4.jsonl"
fi

# SD_RS_BIN: a prebuilt sd-rs (e.g. a copy kept outside the tree); else build one.
if [ -n "${SD_RS_BIN:-}" ]; then
  SD="$SD_RS_BIN"
else
  cargo build --release
  SD=target/release/sd-rs
fi
has_checkpoint() { ls "$1/checkpoints" 2>/dev/null | grep -q '^checkpoint-'; }

if [ ! -f "$VAE/config.json" ]; then
  echo "== training the VAE into $VAE"
  resume=(); has_checkpoint "$VAE" && resume=(--resume)
  "$SD" train-vae --config configs/sd-rs-anime/vae.toml --images "$DATA_V1/data.jsonl" \
    -o "$VAE" --device "$DEVICE" "${resume[@]}"
fi

# The decoder is then fine-tuned on its own (the encoder, so the latents the U-Net learns from,
# stay fixed): sharper images for the same U-Net. It only needs $VAE, so it may run beside the
# U-Net's training.
if [ ! -f "$VAE_FT/config.json" ]; then
  echo "== fine-tuning the VAE's decoder into $VAE_FT"
  resume=(); has_checkpoint "$VAE_FT" && resume=(--resume)
  "$SD" train-vae --config configs/sd-rs-anime/vae.toml --images "$DATA_V1/data.jsonl" \
    --init "$VAE" --decoder-only --steps 1500 -o "$VAE_FT" --device "$DEVICE" "${resume[@]}"
fi

# One U-Net and text encoder stage: unet_stage OUT CAPTIONS CONFIG [train options...]. `train`
# writes a usable model folder (model_index.json included) at every validation, so a finished
# stage is marked by a file written only once its command has returned.
unet_stage() {
  local out="$1" captions="$2" config="$3"
  shift 3
  [ -f "$out/.finished" ] && return
  echo "== training the U-Net and text encoder into $out ($config)"
  resume=(); has_checkpoint "$out" && resume=(--resume)
  "$SD" train --config "$config" --captions "$captions" -o "$out" --device "$DEVICE" \
    --save-f16 "$@" "${resume[@]}"
  touch "$out/.finished"
}

unet_stage "$MODEL" "$DATA_V1/data.jsonl" configs/sd-rs-anime/unet.toml --vae "$VAE"
# Second stage: the same U-Net and text encoder trained further from their EMA weights, with
# a fresh warm-up and cosine decay (see the config for why).
unet_stage "$MODEL_FT" "$DATA_V1/data.jsonl" configs/sd-rs-anime/unet-finetune.toml --model "$MODEL"

# with_decoder SRC DEST: the model SRC with the VAE whose decoder was fine-tuned ($VAE_FT, f32:
# under 3 MB), written to DEST whole or not at all.
with_decoder() {
  local src="$1" dest="$2"
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp/vae"
  cp -r "$src"/{model_index.json,generation_config.json,unet,text_encoder,tokenizer,scheduler} \
    "$dest.tmp/"
  cp "$VAE_FT"/{config.json,diffusion_pytorch_model.safetensors} "$dest.tmp/vae/"
  rm -rf "$dest" && mv "$dest.tmp" "$dest"
}

# The model shipped until 2026-12-06 (second stage, fine-tuned decoder), which the eyewear
# stages start from: they encode their latents with its VAE and pass it on.
[ -f "$MODEL_FT_VAE/model_index.json" ] || with_decoder "$MODEL_FT" "$MODEL_FT_VAE"
# Third and fourth stages (2026-12-06): tag dropout on the one-frame data set, then the same
# with the eyewear images repeated (see the two configs). The third stage was run as 2,000
# steps continued to 5,000 with --resume --steps 5000; in one go the cosine curve differs a
# little.
unet_stage "$MODEL_GLASSES" "$DATA_V2/data.jsonl" configs/sd-rs-anime/unet-glasses.toml \
  --model "$MODEL_FT_VAE" --steps 5000
unet_stage "$MODEL_EYEWEAR" "$DATA_V2/data-eyewear.jsonl" configs/sd-rs-anime/unet-eyewear.toml \
  --model "$MODEL_GLASSES"
# Fifth stage (2026-12-06, night): the same captions with far less tag dropout.
unet_stage "$MODEL_TAGS" "$DATA_V2/data-eyewear.jsonl" configs/sd-rs-anime/unet-tags.toml \
  --model "$MODEL_EYEWEAR"
# Sixth stage (2026-12-07): the glasses images drawn twice as often as the sunglasses ones.
unet_stage "$MODEL_WEIGHTED" "$DATA_V2/data-glasses4.jsonl" \
  configs/sd-rs-anime/unet-glasses-weighted.toml --model "$MODEL_TAGS"

echo "== copying the model into models/sd-rs-anime"
with_decoder "$MODEL_WEIGHTED" models/sd-rs-anime
du -sh models/sd-rs-anime

echo "== measuring prompt following"
SAMPLES="$WORK/eval-samples"
rm -rf "$SAMPLES"
"$SD" generate --model models/sd-rs-anime --from-file prompts/eval-default-model.txt \
  -o "$SAMPLES" --device "$DEVICE"
scripts/.venv/bin/python scripts/eval_prompt_following.py "$SAMPLES" --grid docs/default-model-grid.png
