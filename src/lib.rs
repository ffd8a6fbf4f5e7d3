//! sd-rs: text-conditioned latent diffusion (Stable Diffusion) on candle.
//!
//! The library does all the work; `src/main.rs` only parses the command line and calls it.
pub mod cli;
pub mod device;
pub mod io;
pub mod mapped;
pub mod model;
pub mod pipeline;
pub mod profile;
pub mod sampler;
pub mod schedule;
pub mod train;
