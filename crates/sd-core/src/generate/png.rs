//! PNG output with the generation parameters in text chunks, as gen_img writes them
//! (generation.md §8.2), and reading them back.
//!
//! Values that Latin-1 can hold go into `tEXt` chunks, others into `iTXt` (UTF-8), as Pillow's
//! `PngInfo.add_text` does.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::{GenerateError, Result};

/// Encodes an 8-bit RGB image with text chunks.
///
/// # Errors
/// [`GenerateError::Invalid`] when `rgb` is not `width·height·3` bytes or encoding fails.
pub fn encode_png(
    rgb: &[u8],
    width: u32,
    height: u32,
    text: &[(String, String)],
) -> Result<Vec<u8>> {
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(GenerateError::Invalid(format!(
            "image buffer of {} bytes for {width}×{height} RGB",
            rgb.len()
        )));
    }
    let err = |e: png::EncodingError| GenerateError::Invalid(format!("PNG encoding: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            if v.chars().all(|c| (c as u32) < 256) {
                enc.add_text_chunk(k.clone(), v.clone()).map_err(err)?;
            } else {
                enc.add_itxt_chunk(k.clone(), v.clone()).map_err(err)?;
            }
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames.
///
/// # Errors
/// [`GenerateError::Io`] naming the path.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| GenerateError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let f = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = BufWriter::new(f);
        w.write_all(bytes).map_err(io)?;
        w.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Reads every `tEXt`, `zTXt` and `iTXt` chunk of a PNG file, in file order.
///
/// # Errors
/// [`GenerateError::Io`] / [`GenerateError::Invalid`] naming the file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let f = std::fs::File::open(path).map_err(|source| GenerateError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |e: &dyn std::fmt::Display| {
        GenerateError::Invalid(format!("{}: not a readable PNG: {e}", path.display()))
    };
    let decoder = png::Decoder::new(std::io::BufReader::new(f));
    let mut reader = decoder.read_info().map_err(|e| bad(&e))?;
    // Text chunks after the image data are only seen once the image is read.
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    reader.next_frame(&mut buf).map_err(|e| bad(&e))?;
    reader.finish().map_err(|e| bad(&e))?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.compressed_latin1_text {
        let text = c.get_text().map_err(|e| bad(&e))?;
        out.push((c.keyword.clone(), text));
    }
    for c in &info.utf8_text {
        let text = c.get_text().map_err(|e| bad(&e))?;
        out.push((c.keyword.clone(), text));
    }
    Ok(out)
}

/// Python's `str(float)` for the values gen_img writes (`7.5`, `7.0`).
pub fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}
