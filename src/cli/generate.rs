//! `sd-rs generate`: text-to-image, img2img and scripted batches.
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt. Omit it with --from-file or --from-png.
    pub prompt: Option<String>,

    /// A local diffusers model directory or a Hugging Face repo id
    /// (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5). Default: the small model shipped
    /// with sd-rs in models/.
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// What the image should not contain.
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,

    /// Denoising steps. Default: per model family (e.g. 20; 1 for turbo models).
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance scale; <= 1 turns guidance off (as turbo models need).
    #[arg(long, visible_alias = "cfg-scale")]
    pub guidance_scale: Option<f64>,

    /// ddpm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras (AUTOMATIC1111 names such as
    /// "Euler a" or "DPM++ 2M Karras" work too).
    #[arg(long)]
    pub sampler: Option<String>,

    /// Seed of the first image; image i uses seed + i. Random when omitted or -1.
    #[arg(long, allow_hyphen_values = true)]
    pub seed: Option<i64>,

    /// Image width in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long, short = 'W')]
    pub width: Option<usize>,

    /// Image height in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long, short = 'H')]
    pub height: Option<usize>,

    /// Images to make per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Images computed together (memory vs speed).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// A PNG file, or a folder where images are named by --name-pattern.
    #[arg(long, short = 'o', default_value = "outputs")]
    pub output: PathBuf,

    /// File names inside an output folder: {index} {seed} {prompt} {line} are replaced.
    #[arg(long, default_value = "{index}-{seed}.png")]
    pub name_pattern: String,

    /// Replace existing output files instead of skipping them.
    #[arg(long)]
    pub overwrite: bool,

    /// Start from this image (img2img).
    #[arg(long)]
    pub init_image: Option<PathBuf>,

    /// img2img: how much of the init image to repaint, 0..1.
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,

    /// Read prompts from a file: one per line, AUTOMATIC1111 options or JSON Lines.
    #[arg(long)]
    pub from_file: Option<PathBuf>,

    /// Run only shard i of n of the prompt file (e.g. 2/4), to split work across processes.
    #[arg(long, requires = "from_file")]
    pub shard: Option<String>,

    /// Re-make an image from the parameters stored in a PNG.
    #[arg(long)]
    pub from_png: Option<PathBuf>,

    /// Also save a strip of the predicted x0 (decoded) at these steps, e.g. 1,5,10,20.
    #[arg(long, value_delimiter = ',')]
    pub show_x0: Vec<usize>,

    /// Compute dtype: f32, f16 or bf16 (half precision needs a GPU).
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Also write an upscaled copy (nearest neighbour, this factor) for viewing small images.
    #[arg(long)]
    pub preview_scale: Option<u32>,
}

pub fn run(_args: GenerateArgs) -> Result<()> {
    Err(super::not_built_yet("generate", "the generate command is issue 5"))
}
