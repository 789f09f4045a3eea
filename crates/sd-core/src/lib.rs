//! sd-core: everything that computes with tensors through libtorch (`tch`): the Stable
//! Diffusion models (U-Net, text encoders, VAE), the tokenizer, noise schedules, and (in later
//! issues) LoRA networks, merging, training and sampling.
//!
//! Model modules are built on a `tch::nn::VarStore` whose variable names are the Diffusers
//! state-dict keys of each component (`down_blocks.0.attentions.0.proj_in.weight`), so LoRA
//! module names derive from them. LDM single-file keys are mapped to those names at load time
//! by `sd_formats`' key tables, never inside model code.

pub mod generate;
pub mod loader;
pub mod lora;
pub mod merge;
pub mod models;
pub mod schedule;
pub mod tensor;
pub mod tokenizer;
pub mod train;
pub mod weights;

#[cfg(test)]
mod tests {
    #[test]
    fn libtorch_links_and_computes() {
        let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let s: f64 = t.sum(tch::Kind::Float).double_value(&[]);
        assert_eq!(s, 6.0);
    }
}
