//! The three networks of a latent diffusion model, each a `Config` (serde, matching diffusers'
//! config.json) and a struct built from a `VarBuilder` with `forward`.
pub mod clip;
pub mod layers;
pub mod ops;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
