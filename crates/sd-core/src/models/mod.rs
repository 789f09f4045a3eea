//! Stable Diffusion networks with Diffusers module paths.

pub mod text_encoder;
pub mod unet;
pub mod vae;
