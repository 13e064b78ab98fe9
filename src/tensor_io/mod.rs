//! Tensor files in and out: safetensors, .npz, .npy and JSON, read into plain
//! host tensors keyed by name; safetensors written atomically.
//!
//! This module owns file formats and nothing else: it knows no loss, no IR and
//! no shapes beyond what a file states. Every failure a user can cause (missing
//! file, truncated or corrupt bytes, unsupported dtype, ragged JSON) is an
//! `IoError` with a message naming the file and the tensor, never a panic.

mod half;
mod json_io;
mod numpy_io;
mod safetensors_io;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

pub use json_io::read_json_str;
pub use safetensors_io::{read_safetensors_bytes, write_safetensors};

/// The element storage of a tensor: one variant per dtype lossc computes with.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F64(Vec<f64>),
    F32(Vec<f32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::F64(v) => v.len(),
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
            TensorData::Bool(v) => v.len(),
        }
    }
}

/// A dense tensor in host memory, row-major (C order).
/// Invariant: `data.len() == product(shape)` (1 for the 0-d shape `[]`).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Number of elements a shape holds, `None` on overflow (a hostile header
/// could claim dims whose product does not fit in `usize`).
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl HostTensor {
    /// Builds a tensor, checking the invariant; the error says what is wrong.
    /// Readers use this instead of the panicking constructors below, because
    /// their shapes and data come from files.
    pub(crate) fn checked(shape: Vec<usize>, data: TensorData) -> Result<HostTensor, String> {
        match element_count(&shape) {
            Some(n) if n == data.len() => Ok(HostTensor { shape, data }),
            Some(n) => Err(format!(
                "shape {shape:?} holds {n} elements but {} values are stored",
                data.len()
            )),
            None => Err(format!("shape {shape:?} overflows the element count")),
        }
    }

    fn new_or_panic(shape: Vec<usize>, data: TensorData) -> HostTensor {
        match HostTensor::checked(shape, data) {
            Ok(t) => t,
            Err(message) => panic!("HostTensor: {message}"),
        }
    }

    /// Panics if `data.len()` does not match `shape` (internal use only).
    pub fn f64(shape: Vec<usize>, data: Vec<f64>) -> HostTensor {
        HostTensor::new_or_panic(shape, TensorData::F64(data))
    }

    /// Panics if `data.len()` does not match `shape` (internal use only).
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> HostTensor {
        HostTensor::new_or_panic(shape, TensorData::F32(data))
    }

    /// Panics if `data.len()` does not match `shape` (internal use only).
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> HostTensor {
        HostTensor::new_or_panic(shape, TensorData::I64(data))
    }

    /// Panics if `data.len()` does not match `shape` (internal use only).
    pub fn bool(shape: Vec<usize>, data: Vec<bool>) -> HostTensor {
        HostTensor::new_or_panic(shape, TensorData::Bool(data))
    }

    /// `"f64" | "f32" | "i64" | "bool"`, the names lossc uses in messages.
    pub fn dtype_name(&self) -> &'static str {
        match self.data {
            TensorData::F64(_) => "f64",
            TensorData::F32(_) => "f32",
            TensorData::I64(_) => "i64",
            TensorData::Bool(_) => "bool",
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Bytes of the elements as stored.
    pub fn bytes(&self) -> usize {
        self.len()
            * match self.data {
                TensorData::F64(_) | TensorData::I64(_) => 8,
                TensorData::F32(_) => 4,
                TensorData::Bool(_) => 1,
            }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element as f64; booleans become 0.0 / 1.0. Large i64 values
    /// round to the nearest f64, as any numeric comparison would.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::F64(v) => v.clone(),
            TensorData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
            TensorData::Bool(v) => v.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// The same tensor with float data in f32 (rounded to nearest) or f64;
    /// integer and boolean tensors unchanged.
    pub fn with_float_precision(self, f32: bool) -> HostTensor {
        let data = match (self.data, f32) {
            (TensorData::F64(v), true) => {
                TensorData::F32(v.into_iter().map(|x| x as f32).collect())
            }
            (TensorData::F32(v), false) => TensorData::F64(v.into_iter().map(f64::from).collect()),
            (d, _) => d,
        };
        HostTensor {
            shape: self.shape,
            data,
        }
    }

    pub fn is_float(&self) -> bool {
        matches!(self.data, TensorData::F64(_) | TensorData::F32(_))
    }

    pub fn is_int(&self) -> bool {
        matches!(self.data, TensorData::I64(_))
    }

    /// Flat (row-major) index of the first NaN or infinity; `None` for
    /// integer and boolean tensors, which cannot hold one.
    pub fn first_non_finite(&self) -> Option<usize> {
        match &self.data {
            TensorData::F64(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::F32(v) => v.iter().position(|x| !x.is_finite()),
            TensorData::I64(_) | TensorData::Bool(_) => None,
        }
    }
}

/// Tensors of one file, ordered by name.
pub type TensorMap = BTreeMap<String, HostTensor>;

/// A failure reading or writing a tensor file.
///
/// `message` is the bare cause. Write failures start `message` with
/// "cannot write: " so that `Display` says "cannot write" instead of
/// "cannot read" without the struct needing an extra field.
#[derive(Debug, Clone, PartialEq)]
pub struct IoError {
    pub path: String,
    pub tensor: Option<String>,
    pub message: String,
}

/// Prefix of `IoError::message` for failures while writing.
const WRITE_PREFIX: &str = "cannot write: ";

impl IoError {
    fn new(path: &str, tensor: Option<&str>, message: impl Into<String>) -> IoError {
        IoError {
            path: path.to_string(),
            tensor: tensor.map(str::to_string),
            message: message.into(),
        }
    }

    fn file(path: &str, message: impl Into<String>) -> IoError {
        IoError::new(path, None, message)
    }

    fn tensor(path: &str, tensor: &str, message: impl Into<String>) -> IoError {
        IoError::new(path, Some(tensor), message)
    }

    fn write(path: &str, message: impl fmt::Display) -> IoError {
        IoError::new(path, None, format!("{WRITE_PREFIX}{message}"))
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (verb, cause) = match self.message.strip_prefix(WRITE_PREFIX) {
            Some(rest) => ("cannot write", rest),
            None => ("cannot read", self.message.as_str()),
        };
        write!(f, "{verb} `{}`: ", self.path)?;
        if let Some(tensor) = &self.tensor {
            write!(f, "tensor `{tensor}`: ")?;
        }
        f.write_str(cause)
    }
}

impl std::error::Error for IoError {}

/// Extensions `read_tensors` understands, for the "unknown extension" message.
const SUPPORTED_EXTENSIONS: &str = ".safetensors, .npz, .npy, .json";

/// Reads every tensor of a file, dispatching on the extension:
/// `.safetensors`, `.npz`, `.npy` (one tensor named after the file stem),
/// `.json`. An unknown extension is an error naming the supported ones.
pub fn read_tensors(path: &Path) -> Result<TensorMap, IoError> {
    let shown = path.display().to_string();
    let extension = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    match extension.as_deref() {
        Some("safetensors") => read_safetensors_bytes(&read_bytes(path, &shown)?, &shown),
        Some("npz") => numpy_io::read_npz_bytes(&read_bytes(path, &shown)?, &shown),
        Some("npy") => {
            let name = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            numpy_io::read_npy_bytes(&read_bytes(path, &shown)?, &name, &shown)
        }
        Some("json") => read_json_str(&read_text(path, &shown)?, &shown),
        _ => Err(IoError::file(
            &shown,
            format!("unknown tensor file extension (lossc reads {SUPPORTED_EXTENSIONS})"),
        )),
    }
}

fn read_bytes(path: &Path, shown: &str) -> Result<Vec<u8>, IoError> {
    std::fs::read(path).map_err(|e| IoError::file(shown, e.to_string()))
}

fn read_text(path: &Path, shown: &str) -> Result<String, IoError> {
    let bytes = read_bytes(path, shown)?;
    String::from_utf8(bytes).map_err(|e| IoError::file(shown, format!("not UTF-8 text: {e}")))
}

/// Inserts a tensor, refusing a second one under the same name: formats
/// such as zip archives can repeat a name, and silently keeping one of the
/// two would hide a broken file.
fn insert_unique(
    map: &mut TensorMap,
    name: String,
    tensor: HostTensor,
    path: &str,
) -> Result<(), IoError> {
    if map.contains_key(&name) {
        return Err(IoError::tensor(path, &name, "appears twice in the file"));
    }
    map.insert(name, tensor);
    Ok(())
}
