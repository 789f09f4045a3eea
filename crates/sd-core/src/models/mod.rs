//! Stable Diffusion networks with Diffusers module paths.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod embeddings;
pub mod layers;
pub mod resnet;
pub mod text_encoder;
pub mod unet;
pub mod vae;
