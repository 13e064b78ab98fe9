//! JSON tensor files: an object mapping each tensor name to a number, a
//! nested array, or an explicit `{"shape": [...], "data": [...], "dtype": ...}`.
//!
//! This module owns the JSON conventions (dtype inference, rectangularity)
//! and nothing else. It must not coerce what a user probably did not mean:
//! strings, nulls, ragged arrays and booleans mixed with numbers are errors
//! that name the tensor and the position, never silently converted.

use serde_json::{Map, Value};

use super::{HostTensor, IoError, TensorData, TensorMap};

/// Parses a JSON tensor file held in memory.
pub fn read_json_str(text: &str, path_for_messages: &str) -> Result<TensorMap, IoError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| IoError::file(path_for_messages, format!("not valid JSON: {e}")))?;
    let Value::Object(entries) = value else {
        return Err(IoError::file(
            path_for_messages,
            format!(
                "the top level must be an object mapping tensor names to values, found {}",
                kind(&value)
            ),
        ));
    };
    // JSON object keys are unique once parsed, so no duplicate check is needed.
    entries
        .iter()
        .map(|(name, value)| {
            let tensor =
                parse_tensor(value).map_err(|m| IoError::tensor(path_for_messages, name, m))?;
            Ok((name.clone(), tensor))
        })
        .collect()
}

fn parse_tensor(value: &Value) -> Result<HostTensor, String> {
    match value {
        Value::Object(fields) => parse_explicit(fields),
        _ => parse_nested(value),
    }
}

/// A scalar or nested array: the shape is read off the first element at
/// each depth, then every element is checked against it.
fn parse_nested(value: &Value) -> Result<HostTensor, String> {
    let shape = nested_shape(value);
    let mut leaves = Vec::new();
    collect_leaves(value, &shape, &mut Vec::new(), &mut leaves)?;
    HostTensor::checked(shape, infer_data(&leaves)?)
}

fn nested_shape(mut value: &Value) -> Vec<usize> {
    let mut shape = Vec::new();
    while let Value::Array(items) = value {
        shape.push(items.len());
        match items.first() {
            Some(first) => value = first,
            None => break,
        }
    }
    shape
}

/// Walks `value` in row-major order, pushing its scalars; `position` is the
/// index path so far, used to point at the offending element.
fn collect_leaves<'v>(
    value: &'v Value,
    shape: &[usize],
    position: &mut Vec<usize>,
    out: &mut Vec<&'v Value>,
) -> Result<(), String> {
    match (shape.split_first(), value) {
        (None, Value::Array(_)) => Err(format!(
            "ragged nested array: element `{}` is an array where a number was expected",
            show_position(position)
        )),
        (None, leaf) => {
            check_scalar(leaf, || describe_position(position))?;
            out.push(leaf);
            Ok(())
        }
        (Some((&len, rest)), Value::Array(items)) if items.len() == len => {
            for (i, item) in items.iter().enumerate() {
                position.push(i);
                collect_leaves(item, rest, position, out)?;
                position.pop();
            }
            Ok(())
        }
        (Some((&len, _)), other) => Err(format!(
            "ragged nested array: element `{}` is {} where {} was expected",
            show_position(position),
            kind_with_len(other),
            array_of(len)
        )),
    }
}

/// `[2][1]` for the index path `[2, 1]`.
fn show_position(position: &[usize]) -> String {
    position.iter().map(|i| format!("[{i}]")).collect()
}

fn describe_position(position: &[usize]) -> String {
    if position.is_empty() {
        "the value".to_string()
    } else {
        format!("element `{}`", show_position(position))
    }
}

/// Only numbers and booleans are tensor elements.
fn check_scalar(value: &Value, at: impl Fn() -> String) -> Result<(), String> {
    match value {
        Value::Number(_) | Value::Bool(_) => Ok(()),
        other => Err(format!(
            "{} is {}; tensor elements must be numbers or booleans",
            at(),
            kind(other)
        )),
    }
}

/// All booleans -> bool; all JSON integers -> i64; otherwise f64. An empty
/// tensor has no elements to go by and is f64, the default float.
fn infer_data(leaves: &[&Value]) -> Result<TensorData, String> {
    let booleans = leaves.iter().filter(|v| v.is_boolean()).count();
    if booleans > 0 && booleans < leaves.len() {
        return Err("mixes booleans and numbers; use one or the other".to_string());
    }
    if booleans > 0 {
        return convert(leaves, "bool", Value::as_bool).map(TensorData::Bool);
    }
    if !leaves.is_empty() && leaves.iter().all(|v| v.is_i64()) {
        return convert(leaves, "i64", Value::as_i64).map(TensorData::I64);
    }
    convert(leaves, "f64", Value::as_f64).map(TensorData::F64)
}

/// Converts every element, naming the first that does not fit `dtype`.
fn convert<T>(
    leaves: &[&Value],
    dtype: &str,
    get: impl Fn(&Value) -> Option<T>,
) -> Result<Vec<T>, String> {
    leaves
        .iter()
        .enumerate()
        .map(|(i, v)| {
            get(v).ok_or_else(|| format!("data element {i} ({v}) is not a valid {dtype}"))
        })
        .collect()
}

/// The explicit form `{"shape": [...], "data": [flat], "dtype": "f64"}`.
fn parse_explicit(fields: &Map<String, Value>) -> Result<HostTensor, String> {
    if let Some(key) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "shape" | "data" | "dtype"))
    {
        return Err(format!(
            "unexpected key `{key}` (a tensor object has `shape`, `data` and optionally `dtype`)"
        ));
    }
    let shape = parse_shape(fields.get("shape"))?;
    let leaves = flat_data(fields.get("data"))?;
    let data = match fields.get("dtype") {
        None => infer_data(&leaves)?,
        Some(Value::String(dtype)) => convert_to(dtype, &leaves)?,
        Some(other) => return Err(format!("`dtype` must be a string, found {}", kind(other))),
    };
    HostTensor::checked(shape, data)
}

fn parse_shape(shape: Option<&Value>) -> Result<Vec<usize>, String> {
    let Some(Value::Array(dims)) = shape else {
        return Err("`shape` must be an array of non-negative integers".to_string());
    };
    dims.iter()
        .map(|d| {
            d.as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .ok_or_else(|| format!("`shape` entry {d} is not a non-negative integer"))
        })
        .collect()
}

fn flat_data(data: Option<&Value>) -> Result<Vec<&Value>, String> {
    let Some(Value::Array(items)) = data else {
        return Err("`data` must be a flat array of numbers or booleans".to_string());
    };
    for (i, item) in items.iter().enumerate() {
        check_scalar(item, || format!("`data[{i}]`"))?;
    }
    Ok(items.iter().collect())
}

/// Converts to a stated dtype; values that do not fit are errors rather
/// than silently rounded or wrapped.
fn convert_to(dtype: &str, leaves: &[&Value]) -> Result<TensorData, String> {
    match dtype {
        "f64" => convert(leaves, dtype, Value::as_f64).map(TensorData::F64),
        "f32" => convert(leaves, dtype, to_f32).map(TensorData::F32),
        "i64" => convert(leaves, dtype, Value::as_i64).map(TensorData::I64),
        "bool" => convert(leaves, dtype, Value::as_bool).map(TensorData::Bool),
        other => Err(format!(
            "unknown dtype `{other}` (expected f64, f32, i64 or bool)"
        )),
    }
}

/// A JSON number as f32, refusing finite values beyond f32's range.
fn to_f32(value: &Value) -> Option<f32> {
    let wide = value.as_f64()?;
    let narrow = wide as f32;
    narrow.is_finite().then_some(narrow)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn kind_with_len(value: &Value) -> String {
    match value {
        Value::Array(items) => array_of(items.len()),
        other => kind(other).to_string(),
    }
}

fn array_of(len: usize) -> String {
    match len {
        1 => "an array of 1 element".to_string(),
        n => format!("an array of {n} elements"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number written with the fewest digits that identify it (Rust's and
    /// Python's `repr`) reads back as the same double: the parser rounds
    /// correctly (serde_json's `float_roundtrip`), where its fast path could
    /// land an ulp away and a JSON input then differed from the same tensor
    /// in safetensors.
    #[test]
    fn shortest_decimal_numbers_read_back_bit_for_bit() {
        // The positive embedding of a fixture case that once read an ulp off.
        let mut values = vec![
            f64::from_bits(13832447363862993606),
            0.1 + 0.2,
            5e-324,
            1.7976931348623157e308,
        ];
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..20000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f64::from_bits(state);
            if x.is_finite() {
                values.push(x);
            }
        }
        let text = format!(
            "{{\"x\": [{}]}}",
            values
                .iter()
                .map(|v| format!("{v:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let tensors = read_json_str(&text, "test.json").unwrap();
        let TensorData::F64(read) = &tensors["x"].data else {
            panic!("a float tensor");
        };
        for (v, r) in values.iter().zip(read) {
            assert_eq!(v.to_bits(), r.to_bits(), "{v:?} read as {r:?}");
        }
    }
}
