//! text_encoder (in progress)
