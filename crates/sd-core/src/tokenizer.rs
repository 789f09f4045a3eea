//! CLIP BPE tokenizer (in progress)
