//! NumPy files: `.npy` (one array) and `.npz` (a zip of `.npy` members),
//! read through ndarray-npy into host tensors.
//!
//! This module owns the mapping from NumPy dtypes to lossc dtypes. It must
//! not guess at dtypes ndarray-npy cannot read (float16, complex, objects,
//! structured arrays): those are errors naming the tensor and the NumPy
//! type descriptor. It never writes NumPy files.

use std::io::{Cursor, Read, Seek};

use ndarray::ArrayD;
use ndarray_npy::{NpzReader, ReadNpyError, ReadNpyExt, ReadNpzError, ReadableElement};

use super::{insert_unique, HostTensor, IoError, TensorData, TensorMap};

/// NumPy dtypes lossc reads, for the "unsupported dtype" message.
const SUPPORTED_DTYPES: &str =
    "float64, float32, int64, int32, int16, int8, uint8, uint16, uint32, bool";

/// Why reading a member as one element type failed: ndarray-npy refuses a
/// type whose descriptor does not match, which is how the dtype is probed.
enum Failure {
    WrongDtype(String),
    Other(String),
}

/// Somewhere one array can be read from, as any element type, repeatedly.
trait ArraySource {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure>;
}

struct NpyBytes<'a>(&'a [u8]);

impl ArraySource for NpyBytes<'_> {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure> {
        ArrayD::<T>::read_npy(Cursor::new(self.0)).map_err(classify_npy)
    }
}

struct NpzMember<'a, R: Read + Seek> {
    archive: &'a mut NpzReader<R>,
    index: usize,
}

impl<R: Read + Seek> ArraySource for NpzMember<'_, R> {
    fn read<T: ReadableElement>(&mut self) -> Result<ArrayD<T>, Failure> {
        self.archive.by_index(self.index).map_err(|e| match e {
            ReadNpzError::Npy(inner) => classify_npy(inner),
            other => Failure::Other(other.to_string()),
        })
    }
}

fn classify_npy(error: ReadNpyError) -> Failure {
    match error {
        ReadNpyError::WrongDescriptor(descriptor) => Failure::WrongDtype(descriptor.to_string()),
        other => Failure::Other(format!("not a valid .npy array: {other}")),
    }
}

/// Reads a `.npy` file held in memory as one tensor called `name`.
pub(crate) fn read_npy_bytes(bytes: &[u8], name: &str, path: &str) -> Result<TensorMap, IoError> {
    let tensor = decode_any(&mut NpyBytes(bytes)).map_err(|m| IoError::tensor(path, name, m))?;
    Ok(TensorMap::from([(name.to_string(), tensor)]))
}

/// Reads every member of a `.npz` archive held in memory; member names lose
/// their `.npy` suffix, as `numpy.load` does.
pub(crate) fn read_npz_bytes(bytes: &[u8], path: &str) -> Result<TensorMap, IoError> {
    let not_npz = |e: ReadNpzError| IoError::file(path, format!("not a valid .npz archive: {e}"));
    let mut archive = NpzReader::new(Cursor::new(bytes)).map_err(not_npz)?;
    let names = archive.names().map_err(not_npz)?;
    let mut tensors = TensorMap::new();
    for (index, name) in names.into_iter().enumerate() {
        let mut member = NpzMember {
            archive: &mut archive,
            index,
        };
        let tensor = decode_any(&mut member).map_err(|m| IoError::tensor(path, &name, m))?;
        insert_unique(&mut tensors, name, tensor, path)?;
    }
    Ok(tensors)
}

/// One probe: read the source as one element type and convert it.
type Attempt<S> = fn(&mut S) -> Result<HostTensor, Failure>;

/// Tries each supported element type in turn until one matches the array's
/// descriptor; any failure other than a dtype mismatch ends the search.
fn decode_any<S: ArraySource>(source: &mut S) -> Result<HostTensor, String> {
    let attempts: [Attempt<S>; 10] = [
        |s| to_tensor(s.read::<f64>()?, |x| x, TensorData::F64),
        |s| to_tensor(s.read::<f32>()?, |x| x, TensorData::F32),
        |s| to_tensor(s.read::<i64>()?, |x| x, TensorData::I64),
        |s| to_tensor(s.read::<i32>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<i16>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<i8>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<u8>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<u16>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<u32>()?, i64::from, TensorData::I64),
        |s| to_tensor(s.read::<bool>()?, |x| x, TensorData::Bool),
    ];
    let mut descriptor = String::from("?");
    for attempt in attempts {
        match attempt(source) {
            Ok(tensor) => return Ok(tensor),
            Err(Failure::WrongDtype(d)) => descriptor = d,
            Err(Failure::Other(message)) => return Err(message),
        }
    }
    Err(format!(
        "unsupported dtype {descriptor} (lossc reads {SUPPORTED_DTYPES})"
    ))
}

/// Flattens in row-major order whatever the file's memory order was: a
/// Fortran-order array is first copied to standard layout.
fn to_tensor<T: Clone, U>(
    array: ArrayD<T>,
    convert: fn(T) -> U,
    wrap: fn(Vec<U>) -> TensorData,
) -> Result<HostTensor, Failure> {
    let shape = array.shape().to_vec();
    let standard = array.as_standard_layout();
    let values = standard.iter().cloned().map(convert).collect();
    HostTensor::checked(shape, wrap(values)).map_err(Failure::Other)
}
