//! The safetensors format: decoding every tensor of a file into host tensors
//! and writing host tensors back, atomically.
//!
//! This module owns dtype mapping (which safetensors dtypes lossc accepts and
//! what each becomes) and the byte-level decoding. It must not interpret
//! names or shapes beyond checking that they agree with the bytes, and must
//! never panic or reinterpret memory on behalf of file contents: bytes are
//! little-endian and may be unaligned, so they are decoded chunk by chunk.

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, View};

use super::half::{bf16_to_f32, f16_to_f32};
use super::{insert_unique, HostTensor, IoError, TensorData, TensorMap};

/// Dtypes lossc reads, for the "unsupported dtype" message.
const SUPPORTED_DTYPES: &str = "F64, F32, F16, BF16, I64, I32, I16, I8, U8, U16, U32, BOOL";

/// Parses a whole safetensors file held in memory.
pub fn read_safetensors_bytes(bytes: &[u8], path_for_messages: &str) -> Result<TensorMap, IoError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| {
        IoError::file(
            path_for_messages,
            format!("not a valid safetensors file (truncated or corrupt): {e}"),
        )
    })?;
    let mut tensors = TensorMap::new();
    for (name, view) in file.iter() {
        let tensor = decode(view.dtype(), view.shape(), view.data())
            .map_err(|message| IoError::tensor(path_for_messages, name, message))?;
        insert_unique(&mut tensors, name.to_string(), tensor, path_for_messages)?;
    }
    Ok(tensors)
}

/// Decodes one tensor's bytes according to its dtype.
fn decode(dtype: Dtype, shape: &[usize], data: &[u8]) -> Result<HostTensor, String> {
    let values = match dtype {
        Dtype::F64 => TensorData::F64(le_chunks(data, f64::from_le_bytes)),
        Dtype::F32 => TensorData::F32(le_chunks(data, f32::from_le_bytes)),
        Dtype::F16 => TensorData::F32(le_chunks(data, |b| f16_to_f32(u16::from_le_bytes(b)))),
        Dtype::BF16 => TensorData::F32(le_chunks(data, |b| bf16_to_f32(u16::from_le_bytes(b)))),
        Dtype::I64 => TensorData::I64(le_chunks(data, i64::from_le_bytes)),
        Dtype::I32 => TensorData::I64(le_chunks(data, |b| i64::from(i32::from_le_bytes(b)))),
        Dtype::I16 => TensorData::I64(le_chunks(data, |b| i64::from(i16::from_le_bytes(b)))),
        Dtype::I8 => TensorData::I64(le_chunks(data, |b| i64::from(i8::from_le_bytes(b)))),
        Dtype::U8 => TensorData::I64(le_chunks(data, |b| i64::from(u8::from_le_bytes(b)))),
        Dtype::U16 => TensorData::I64(le_chunks(data, |b| i64::from(u16::from_le_bytes(b)))),
        Dtype::U32 => TensorData::I64(le_chunks(data, |b| i64::from(u32::from_le_bytes(b)))),
        Dtype::BOOL => TensorData::Bool(decode_bools(data)?),
        other => {
            return Err(format!(
                "unsupported dtype {other} (lossc reads {SUPPORTED_DTYPES})"
            ))
        }
    };
    HostTensor::checked(shape.to_vec(), values)
}

/// Decodes fixed-size little-endian elements. A trailing partial chunk
/// cannot survive the crate's size validation; if one did, the element
/// count would disagree with the shape and `HostTensor::checked` rejects it.
fn le_chunks<const N: usize, T>(data: &[u8], decode: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N)
        .filter_map(|chunk| <[u8; N]>::try_from(chunk).ok())
        .map(decode)
        .collect()
}

/// Booleans are one byte each; anything but 0 or 1 means the bytes are not
/// what the header claims, so it is refused rather than guessed at.
fn decode_bools(data: &[u8]) -> Result<Vec<bool>, String> {
    data.iter()
        .enumerate()
        .map(|(i, &byte)| match byte {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("invalid BOOL byte {byte} at element {i}")),
        })
        .collect()
}

/// One tensor encoded for writing: the `View` the safetensors crate needs.
struct Encoded {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Encoded {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(tensor: &HostTensor) -> Encoded {
    let (dtype, bytes) = match &tensor.data {
        TensorData::F64(v) => (Dtype::F64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        TensorData::Bool(v) => (Dtype::BOOL, v.iter().map(|&b| u8::from(b)).collect()),
    };
    Encoded {
        dtype,
        shape: tensor.shape.clone(),
        bytes,
    }
}

/// Writes a safetensors file atomically: the bytes go to a temporary file
/// in the same directory (so the rename cannot cross filesystems), which is
/// then renamed over `path`; a failure never leaves a half-written file.
pub fn write_safetensors(path: &Path, tensors: &TensorMap) -> Result<(), IoError> {
    let shown = path.display().to_string();
    let encoded: Vec<(&str, Encoded)> = tensors
        .iter()
        .map(|(name, tensor)| (name.as_str(), encode(tensor)))
        .collect();
    let views = encoded.iter().map(|(name, e)| (*name, e));
    let bytes = safetensors::serialize(views, None).map_err(|e| IoError::write(&shown, e))?;
    let temporary = temporary_path(path);
    let result = write_synced(&temporary, &bytes).and_then(|()| std::fs::rename(&temporary, path));
    if let Err(e) = result {
        // Best effort: the temporary may not even exist (e.g. no directory).
        let _ = std::fs::remove_file(&temporary);
        return Err(IoError::write(&shown, e));
    }
    Ok(())
}

/// `<path>.tmp-<pid>-<n>`: the pid keeps concurrent processes apart and the
/// counter keeps concurrent writes of one process (test threads) apart.
fn temporary_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".tmp-{}-{n}", std::process::id()));
    PathBuf::from(name)
}

/// Writes and flushes to disk, so that the rename publishes complete bytes.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
