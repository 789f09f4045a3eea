//! A minimal TensorBoard event-file writer (scalars only) and a reader for checking such files.
//!
//! An event file is a sequence of TFRecords: `u64` little-endian payload length, the masked
//! CRC32C of those 8 length bytes (`u32` LE), the payload, the masked CRC32C of the payload
//! (`u32` LE). Each payload is a `tensorflow.Event` protobuf; this module encodes the few
//! fields it needs by hand:
//!
//! * `Event`: `wall_time` (double, field 1), `step` (int64, field 2), `file_version`
//!   (string, field 3; only in the first record, `"brain.Event:2"`), `summary` (field 5);
//! * `Summary`: repeated `value` (field 1);
//! * `Summary.Value`: `tag` (string, field 1), `simple_value` (float, field 2).
//!
//! Like PyTorch's `SummaryWriter.add_scalar` (which sd-scripts reaches through accelerate),
//! every scalar is written as its own event.
//!
//! # Source
//! training.md §12.4 (what is logged and where); the TFRecord framing and the `Event` /
//! `Summary` messages of TensorFlow's `event.proto` / `summary.proto`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The `file_version` of the first record of every event file.
pub const FILE_VERSION: &str = "brain.Event:2";

const MASK_DELTA: u32 = 0xa282_ead8;

/// The TFRecord "masked" CRC32C of `data`: the CRC32C rotated right by 15 bits plus
/// `0xa282ead8` (wrapping).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Writes scalar events into one TensorBoard event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir` (and its parents) and the file
    /// `events.out.tfevents.<unix seconds>.<hostname>` in it, and writes the `file_version`
    /// record stamped `wall_time` (seconds since the Unix epoch).
    ///
    /// # Errors
    /// The I/O error of creating the folder or the file.
    pub fn create(dir: &Path, wall_time: f64) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!(
            "events.out.tfevents.{}.{}",
            wall_time as u64,
            hostname()
        ));
        let file = BufWriter::new(File::create(&path)?);
        let mut w = Self { file, path };
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time);
        put_varint_field(&mut event, 2, 0);
        put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
        w.write_record(&event)?;
        w.file.flush()?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes one event per `(tag, value)` at `step`, stamped `wall_time` (Unix seconds), and
    /// flushes the file so that TensorBoard sees the step while training goes on.
    ///
    /// # Errors
    /// The I/O error of writing the file.
    pub fn add_scalars(
        &mut self,
        step: i64,
        wall_time: f64,
        scalars: &[(&str, f32)],
    ) -> io::Result<()> {
        for (tag, value) in scalars {
            let mut val = Vec::new();
            put_bytes(&mut val, 1, tag.as_bytes());
            put_key(&mut val, 2, 5);
            val.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            put_bytes(&mut summary, 1, &val);
            let mut event = Vec::new();
            put_double(&mut event, 1, wall_time);
            put_varint_field(&mut event, 2, step as u64);
            put_bytes(&mut event, 5, &summary);
            self.write_record(&event)?;
        }
        self.file.flush()
    }

    fn write_record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc32c(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc32c(data).to_le_bytes())
    }
}

/// The host name for the event file name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`,
/// else `localhost`.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u32) {
    put_varint(out, u64::from((field << 3) | wire));
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

fn put_double(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// One decoded event (only the fields this module writes).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub wall_time: f64,
    /// Global step.
    pub step: i64,
    /// `file_version`, set in the first record.
    pub file_version: Option<String>,
    /// `(tag, simple_value)` of every summary value.
    pub scalars: Vec<(String, f32)>,
}

/// Reads every record of an event file, checking the framing and both CRCs, and decodes the
/// `Event` fields this module writes (others are skipped).
///
/// # Errors
/// `InvalidData` naming the file and the byte offset of a truncated record, a CRC mismatch or
/// a malformed protobuf; the I/O error of reading the file.
pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    let data = std::fs::read(path)?;
    let bad = |at: usize, what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: record at byte {at}: {what}", path.display()),
        )
    };
    let mut events = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let header = data
            .get(pos..pos + 12)
            .ok_or_else(|| bad(pos, "truncated header"))?;
        let len_bytes = &header[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().map_err(|_| bad(pos, "header"))?);
        let len_crc = u32::from_le_bytes(header[8..12].try_into().map_err(|_| bad(pos, "header"))?);
        if len_crc != masked_crc32c(len_bytes) {
            return Err(bad(pos, "length CRC mismatch"));
        }
        let len = usize::try_from(len).map_err(|_| bad(pos, "length too large"))?;
        let start = pos + 12;
        let end = start
            .checked_add(len)
            .filter(|e| e.checked_add(4).is_some_and(|e4| e4 <= data.len()))
            .ok_or_else(|| bad(pos, "truncated payload"))?;
        let payload = &data[start..end];
        let crc = u32::from_le_bytes(
            data[end..end + 4]
                .try_into()
                .map_err(|_| bad(pos, "truncated payload CRC"))?,
        );
        if crc != masked_crc32c(payload) {
            return Err(bad(pos, "payload CRC mismatch"));
        }
        events.push(decode_event(payload).ok_or_else(|| bad(pos, "malformed Event protobuf"))?);
        pos = end + 4;
    }
    Ok(events)
}

/// A protobuf field: number and value.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn fields(buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = get_varint(buf, &mut pos)?;
        let f = match key & 7 {
            0 => Field::Varint(get_varint(buf, &mut pos)?),
            1 => {
                let b = buf.get(pos..pos + 8)?.try_into().ok()?;
                pos += 8;
                Field::Fixed64(b)
            }
            2 => {
                let n = usize::try_from(get_varint(buf, &mut pos)?).ok()?;
                let b = buf.get(pos..pos.checked_add(n)?)?;
                pos += n;
                Field::Bytes(b)
            }
            5 => {
                let b = buf.get(pos..pos + 4)?.try_into().ok()?;
                pos += 4;
                Field::Fixed32(b)
            }
            _ => return None,
        };
        out.push((key >> 3, f));
    }
    Some(out)
}

fn decode_event(buf: &[u8]) -> Option<Event> {
    let mut ev = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    for (num, f) in fields(buf)? {
        match (num, f) {
            (1, Field::Fixed64(b)) => ev.wall_time = f64::from_le_bytes(b),
            (2, Field::Varint(v)) => ev.step = v as i64,
            (3, Field::Bytes(b)) => ev.file_version = Some(String::from_utf8(b.to_vec()).ok()?),
            (5, Field::Bytes(summary)) => {
                for (num, f) in fields(summary)? {
                    if let (1, Field::Bytes(value)) = (num, f) {
                        let mut tag = None;
                        let mut simple = None;
                        for (num, f) in fields(value)? {
                            match (num, f) {
                                (1, Field::Bytes(b)) => {
                                    tag = Some(String::from_utf8(b.to_vec()).ok()?);
                                }
                                (2, Field::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                                _ => {}
                            }
                        }
                        ev.scalars.push((tag?, simple?));
                    }
                }
            }
            _ => {}
        }
    }
    Some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_known_vectors() {
        // CRC32C check value of "123456789" (RFC 3720 / the crc32c crate's docs).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // Masked: empty data has CRC 0, so the mask is the delta alone.
        assert_eq!(masked_crc32c(b""), 0xa282_ead8);
        // Computed with a bitwise CRC32C and TensorFlow's mask formula in Python.
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
        assert_eq!(masked_crc32c(&0u64.to_le_bytes()), 0x0798_0329);
    }

    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("20260101000000").join("network_train");
        let mut w = EventWriter::create(&sub, 1_700_000_000.5).unwrap();
        let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("events.out.tfevents.1700000000."),
            "{name}"
        );
        w.add_scalars(
            1,
            1_700_000_001.25,
            &[("loss/current", 0.125), ("lr/unet", 1e-4)],
        )
        .unwrap();
        w.add_scalars(300, 1_700_000_002.0, &[("loss/average", 0.5)])
            .unwrap();
        let path = w.path().to_path_buf();
        drop(w);

        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
        assert_eq!(events[0].wall_time, 1_700_000_000.5);
        assert!(events[0].scalars.is_empty());
        assert_eq!(events[1].step, 1);
        assert_eq!(events[1].wall_time, 1_700_000_001.25);
        assert_eq!(events[1].scalars, vec![("loss/current".to_string(), 0.125)]);
        assert_eq!(events[2].scalars, vec![("lr/unet".to_string(), 1e-4)]);
        assert_eq!(events[3].step, 300); // two-byte varint
        assert_eq!(events[3].scalars, vec![("loss/average".to_string(), 0.5)]);

        // The exact bytes of the first scalar record's payload.
        let bytes = std::fs::read(&path).unwrap();
        let first_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let rec = &bytes[first_len + 16..];
        let len = u64::from_le_bytes(rec[..8].try_into().unwrap()) as usize;
        let mut expected = vec![0x09];
        expected.extend_from_slice(&1_700_000_001.25f64.to_le_bytes());
        expected.extend_from_slice(&[0x10, 0x01, 0x2a, 21, 0x0a, 19, 0x0a, 12]);
        expected.extend_from_slice(b"loss/current");
        expected.push(0x15);
        expected.extend_from_slice(&0.125f32.to_le_bytes());
        assert_eq!(&rec[12..12 + len], &expected[..]);

        // A flipped payload byte is caught by the CRC.
        let mut corrupt = bytes.clone();
        corrupt[14] ^= 1;
        let bad = dir.path().join("bad");
        std::fs::write(&bad, &corrupt).unwrap();
        let err = read_events(&bad).unwrap_err().to_string();
        assert!(err.contains("payload CRC mismatch"), "{err}");
        std::fs::write(&bad, &bytes[..bytes.len() - 2]).unwrap();
        let err = read_events(&bad).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}
