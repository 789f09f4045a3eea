mod bad_inputs;
mod interrupt;
mod resize_images;
mod tools;
