//! vae (in progress)
