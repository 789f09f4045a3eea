
mod resize_images;
mod bad_inputs;
mod interrupt;
mod tools;
