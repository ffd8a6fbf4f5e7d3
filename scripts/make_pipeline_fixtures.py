"""Build tiny end-to-end pipeline fixtures for tests/pipeline_parity.rs.

Run from the repository root, after scripts/make_text_fixtures.py (its tokenizers are reused):

    scripts/.venv/bin/python scripts/make_pipeline_fixtures.py

For three families it saves a complete tiny diffusers model directory (random weights from fixed
seeds) under tests/fixtures/pipeline/<family>/ and runs diffusers' own pipeline on it with
injected initial latents, recording in expected.safetensors the final latents and the decoded
image (output_type="np", float in [0, 1]) for DDIM and Euler:

    sd15/  StableDiffusionPipeline, epsilon, scaled_linear + leading (SD 1.5's scheduler config)
    sd2/   StableDiffusionPipeline, v_prediction, trailing + zero-SNR rescale, linear projection
    sdxl/  StableDiffusionXLPipeline, two text encoders, text_time conditioning,
           an empty negative prompt (force_zeros_for_empty_prompt)

The case list (prompt, negative prompt, guidance, steps, size) is written to cases.json.
Nothing is downloaded.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")
OUT = os.path.join(FIXTURES, "pipeline")
TEXT = os.path.join(FIXTURES, "text")

SIZE = 32  # image side: latents are 4 x 4 x 4 with the factor-8 VAE
STEPS = 4


def randomize(module, seed, std=0.15):
    """diffusers zero-initialises some layers (conv_out, proj_out): give every weight a random
    value so the comparison exercises every tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return module


def tiny_vae(seed):
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[4, 8, 8, 8],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
    )
    return randomize(vae, seed, std=0.1)


def tiny_clip(seed, cls=CLIPTextModel, **overrides):
    cfg = dict(
        vocab_size=241,  # the tiny BPE vocabularies of scripts/make_text_fixtures.py
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=239,
        eos_token_id=240,
        pad_token_id=1,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = cls(CLIPTextConfig(**cfg))
    return randomize(model, seed, std=0.1)


def unet(seed, **kw):
    base = dict(
        sample_size=SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=[8, 16],
        norm_num_groups=4,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    base.update(kw)
    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**base), seed, std=0.1)


def sd15_scheduler():
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def sd2_scheduler():
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    )


def clip_tokenizer(src):
    return CLIPTokenizer.from_pretrained(os.path.join(TEXT, src))


def build(name):
    if name == "sd15":
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(1),
            text_encoder=tiny_clip(2),
            tokenizer=clip_tokenizer("clip_l/tokenizer"),
            unet=unet(3),
            scheduler=sd15_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif name == "sd2":
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(11),
            text_encoder=tiny_clip(12, hidden_act="gelu", pad_token_id=0),
            tokenizer=clip_tokenizer("openclip_h/tokenizer"),
            unet=unet(
                13,
                use_linear_projection=True,
                attention_head_dim=[2, 4],
                upcast_attention=True,
            ),
            scheduler=sd2_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif name == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(21),
            text_encoder=tiny_clip(22),
            text_encoder_2=tiny_clip(23, cls=CLIPTextModelWithProjection, hidden_act="gelu", projection_dim=8, pad_token_id=0),
            tokenizer=clip_tokenizer("sdxl/tokenizer"),
            tokenizer_2=clip_tokenizer("sdxl/tokenizer_2"),
            unet=unet(
                24,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
                cross_attention_dim=32,  # both encoders' 16 concatenated
                transformer_layers_per_block=[1, 2],
                attention_head_dim=[2, 4],
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=4,
                projection_class_embeddings_input_dim=8 + 6 * 4,
            ),
            scheduler=sd15_scheduler(),
            force_zeros_for_empty_prompt=True,
        )
    else:
        raise ValueError(name)
    return pipe


CASES = {
    "sd15": dict(prompt="anime girl, red hair", negative_prompt="blurry", guidance_scale=7.5),
    "sd2": dict(prompt="anime girl, blue hair, smiling", negative_prompt="lowres", guidance_scale=5.0),
    "sdxl": dict(prompt="anime girl, red hair", negative_prompt="", guidance_scale=6.0),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = {}
    for name in ["sd15", "sd2", "sdxl"]:
        pipe = build(name)
        d = os.path.join(OUT, name)
        shutil.rmtree(d, ignore_errors=True)
        pipe.save_pretrained(d, safe_serialization=True)
        case = dict(CASES[name], steps=STEPS, width=SIZE, height=SIZE, batch=2)
        cases[name] = case
        gen = torch.Generator().manual_seed(100)
        latents = torch.randn((2, 4, SIZE // 8, SIZE // 8), generator=gen)
        expected = {"initial_latents": latents}
        for sampler, cls in [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)]:
            pipe.scheduler = cls.from_config(pipe.scheduler.config)
            seen = {}

            def grab(p, i, t, kw):
                seen["latents"] = kw["latents"]
                return kw

            kwargs = dict(
                prompt=case["prompt"],
                negative_prompt=case["negative_prompt"] or None,
                guidance_scale=case["guidance_scale"],
                num_inference_steps=STEPS,
                width=SIZE,
                height=SIZE,
                num_images_per_prompt=2,
                latents=latents.clone(),
                output_type="np",
                callback_on_step_end=grab,
                callback_on_step_end_tensor_inputs=["latents"],
            )
            if name == "sdxl":
                kwargs["negative_prompt"] = None  # empty: zeros, via force_zeros_for_empty_prompt
            images = pipe(**kwargs).images
            expected[f"{sampler}_latents"] = seen["latents"].contiguous()
            expected[f"{sampler}_image"] = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
            print(name, sampler, "image mean", float(images.mean()), "latent std", float(seen["latents"].std()))
        save_file(expected, os.path.join(d, "expected.safetensors"))
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=2, sort_keys=True)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(OUT) for x in fs)
    print(f"wrote {OUT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
