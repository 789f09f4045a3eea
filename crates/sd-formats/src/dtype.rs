//! Element types of stored tensors, their names in safetensors headers and PyTorch pickles, and
//! conversion of raw little-endian bytes to `f32`.

use half::{bf16, f16};

/// Element type of a stored tensor.
///
/// Only the types Stable Diffusion files use; 8-bit floats and unsigned 16/32/64-bit integers are
/// refused when reading (see [`crate::Error::UnsupportedDtype`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    /// IEEE 754 binary64.
    F64,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (upper 16 bits of a binary32).
    BF16,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte per element (0 or 1).
    Bool,
}

impl Dtype {
    /// All dtypes, in declaration order.
    pub const ALL: [Dtype; 10] = [
        Dtype::F64,
        Dtype::F32,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::I8,
        Dtype::U8,
        Dtype::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
        }
    }

    /// Whether the type is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }

    /// The name in a safetensors header (`"F32"`, `"BF16"`, `"BOOL"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            Dtype::F64 => "F64",
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::I16 => "I16",
            Dtype::I8 => "I8",
            Dtype::U8 => "U8",
            Dtype::Bool => "BOOL",
        }
    }

    /// Parses a safetensors header dtype (`"F32"`, ...); `None` for unknown or unsupported names.
    pub fn from_safetensors_name(name: &str) -> Option<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == name)
    }

    /// Parses a PyTorch storage class name as pickled in checkpoints (`"FloatStorage"`,
    /// `"HalfStorage"`, `"BFloat16Storage"`, ...; the module `torch` is not part of `name`).
    /// `UntypedStorage` maps to [`Dtype::U8`] (its elements are bytes).
    pub fn from_torch_storage(name: &str) -> Option<Dtype> {
        Some(match name {
            "DoubleStorage" => Dtype::F64,
            "FloatStorage" => Dtype::F32,
            "HalfStorage" => Dtype::F16,
            "BFloat16Storage" => Dtype::BF16,
            "LongStorage" => Dtype::I64,
            "IntStorage" => Dtype::I32,
            "ShortStorage" => Dtype::I16,
            "CharStorage" => Dtype::I8,
            "ByteStorage" | "UntypedStorage" => Dtype::U8,
            "BoolStorage" => Dtype::Bool,
            _ => return None,
        })
    }

    /// Parses a torch dtype attribute name (`"float32"`, `"float16"`, `"bfloat16"`, ...), as in
    /// `torch.float16`.
    pub fn from_torch_dtype(name: &str) -> Option<Dtype> {
        Some(match name {
            "float64" | "double" => Dtype::F64,
            "float32" | "float" => Dtype::F32,
            "float16" | "half" => Dtype::F16,
            "bfloat16" => Dtype::BF16,
            "int64" | "long" => Dtype::I64,
            "int32" | "int" => Dtype::I32,
            "int16" | "short" => Dtype::I16,
            "int8" => Dtype::I8,
            "uint8" => Dtype::U8,
            "bool" => Dtype::Bool,
            _ => return None,
        })
    }

    /// Rank in the safetensors crate's dtype order (ascending `BOOL < U8 < I8 < I16 < F16 < BF16
    /// < I32 < F32 < F64 < I64`), which decides the tensor order of written files.
    ///
    /// # Source
    /// spec/lora-format.md §1.1 (order of the Rust `safetensors` crate's `Dtype` enum).
    pub fn safetensors_rank(self) -> u8 {
        match self {
            Dtype::Bool => 0,
            Dtype::U8 => 1,
            Dtype::I8 => 2,
            Dtype::I16 => 5,
            Dtype::F16 => 7,
            Dtype::BF16 => 8,
            Dtype::I32 => 9,
            Dtype::F32 => 11,
            Dtype::F64 => 12,
            Dtype::I64 => 13,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.safetensors_name())
    }
}

/// Converts raw little-endian elements of `dtype` to `f32`.
///
/// Floats convert exactly where `f32` can hold the value (F16, BF16, F32) and round to nearest
/// from F64; integers and booleans convert with `as f32`. A trailing partial element is ignored
/// (callers pass validated lengths).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    fn conv<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
            .collect()
    }
    match dtype {
        Dtype::F64 => conv(bytes, |b| f64::from_le_bytes(b) as f32),
        Dtype::F32 => conv(bytes, f32::from_le_bytes),
        Dtype::F16 => conv(bytes, |b| f16::from_le_bytes(b).to_f32()),
        Dtype::BF16 => conv(bytes, |b| bf16::from_le_bytes(b).to_f32()),
        Dtype::I64 => conv(bytes, |b| i64::from_le_bytes(b) as f32),
        Dtype::I32 => conv(bytes, |b| i32::from_le_bytes(b) as f32),
        Dtype::I16 => conv(bytes, |b| i16::from_le_bytes(b) as f32),
        Dtype::I8 => conv(bytes, |b: [u8; 1]| b[0] as i8 as f32),
        Dtype::U8 | Dtype::Bool => conv(bytes, |b: [u8; 1]| b[0] as f32),
    }
}

/// Whether any element is NaN or ±infinity; always `false` for integer types.
pub fn has_non_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        // Exponent bits all ones means Inf or NaN.
        Dtype::F64 => bytes
            .chunks_exact(8)
            .any(|c| !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite()),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .any(|c| !f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite()),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 == 0x7c00),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .any(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 == 0x7f80),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sizes() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_safetensors_name(d.safetensors_name()), Some(d));
        }
        assert_eq!(Dtype::from_safetensors_name("F8_E4M3"), None);
        assert_eq!(Dtype::from_safetensors_name("f32"), None);
        assert_eq!(Dtype::BF16.size(), 2);
        assert_eq!(Dtype::I64.size(), 8);
        assert_eq!(Dtype::Bool.size(), 1);
        assert_eq!(
            Dtype::from_torch_storage("BFloat16Storage"),
            Some(Dtype::BF16)
        );
        assert_eq!(Dtype::from_torch_storage("HalfStorage"), Some(Dtype::F16));
        assert_eq!(Dtype::from_torch_storage("ComplexFloatStorage"), None);
        assert_eq!(Dtype::from_torch_dtype("bfloat16"), Some(Dtype::BF16));
    }

    #[test]
    fn rank_follows_safetensors_order() {
        let mut v = Dtype::ALL.to_vec();
        v.sort_by_key(|d| d.safetensors_rank());
        let names: Vec<_> = v.iter().map(|d| d.safetensors_name()).collect();
        assert_eq!(
            names,
            [
                "BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"
            ]
        );
    }

    #[test]
    fn conversion_and_non_finite() {
        let h: Vec<u8> = [1.5f32, -2.0, 65504.0]
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::F16, &h), vec![1.5, -2.0, 65504.0]);
        assert!(!has_non_finite(Dtype::F16, &h));
        let b: Vec<u8> = [1.0f32, f32::INFINITY]
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect();
        assert_eq!(to_f32(Dtype::BF16, &b), vec![1.0, f32::INFINITY]);
        assert!(has_non_finite(Dtype::BF16, &b));
        let n = f16::NAN.to_le_bytes();
        assert!(has_non_finite(Dtype::F16, &n));
        assert_eq!(to_f32(Dtype::I64, &(-3i64).to_le_bytes()), vec![-3.0]);
        assert!(!has_non_finite(Dtype::I64, &[0xff; 8]));
    }
}
