
mod resize_images;
