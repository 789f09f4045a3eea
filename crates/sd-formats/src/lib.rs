//! sd-formats: reading and writing the files Stable Diffusion tools exchange, without libtorch.
//!
//! Owns: safetensors (memory-mapped read, atomic write with `__metadata__`), PyTorch
//! `.ckpt`/`.pt`/`.bin` files read by a pickle reader that never executes anything, dtypes,
//! Diffusers model folders, the LDM (single-file) <-> Diffusers key tables and model-family
//! detection. Does not own: any arithmetic on tensors (sd-core does that with libtorch).

pub mod ckpt;
pub mod dtype;
pub mod error;
pub mod pickle;
pub mod safetensors;
pub mod tensor_file;

pub mod diffusers;
pub mod family;
pub mod hashes;
pub mod keymap;
pub mod lora;
pub mod metadata;
