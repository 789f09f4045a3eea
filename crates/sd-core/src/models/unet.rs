//! unet (in progress)
