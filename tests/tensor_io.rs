//! Integration tests of `lossc::tensor_io`: reading the reference fixtures,
//! round trips through `write_safetensors`, hand-built safetensors files
//! (F16/BF16, unaligned data, unsupported dtypes), JSON and NumPy inputs,
//! and the errors a broken or missing file must produce.
//!
//! These tests only write under `std::env::temp_dir()`, each in its own
//! folder, and never modify the fixtures.

use std::path::{Path, PathBuf};

use lossc::tensor_io::*;
use ndarray::{arr0, Array1, Array2, ArrayD, IxDyn};
use ndarray_npy::{NpzWriter, WriteNpyExt};
use serde_json::json;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fresh, empty folder for one test, so parallel tests never collide;
/// removed again when the test ends, pass or fail.
struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn scratch_dir(test: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("lossc-tensor-io-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

/// Builds a safetensors file by hand, without padding the header, so that
/// tensor data can land at odd addresses.
fn hand_built_safetensors(entries: &[(&str, &str, &[usize], Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let header = serde_json::Value::Object(header).to_string().into_bytes();
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    file
}

fn u16_bytes(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn f32_data(tensor: &HostTensor) -> &[f32] {
    match &tensor.data {
        TensorData::F32(v) => v,
        other => panic!("expected f32 data, got {other:?}"),
    }
}

// ---------------------------------------------------------------- fixtures

#[test]
fn reads_the_mnrl_fixture() {
    let tensors = read_tensors(&fixture("mnrl_pairs_cos_s20_b8_d16.safetensors")).unwrap();
    for name in [
        "input.anchor",
        "input.positive",
        "grad.anchor",
        "grad.positive",
    ] {
        let t = &tensors[name];
        assert_eq!(t.shape, vec![8, 16], "{name}");
        assert_eq!(t.dtype_name(), "f64", "{name}");
        assert_eq!(t.len(), 128);
        assert_eq!(t.first_non_finite(), None);
    }
    let loss = &tensors["loss"];
    assert_eq!(loss.shape, Vec::<usize>::new());
    assert_eq!(loss.dtype_name(), "f64");
    let value = loss.to_f64_vec()[0];
    assert!(value.is_finite() && value > 0.0, "loss = {value}");
}

#[test]
fn reads_int64_labels() {
    let tensors =
        read_tensors(&fixture("contrastive_euclidean_m3_sum_b5_d12.safetensors")).unwrap();
    let labels = &tensors["input.labels"];
    assert_eq!(labels.shape, vec![5]);
    assert_eq!(labels.dtype_name(), "i64");
    assert!(labels.is_int() && !labels.is_float());
    assert!(labels.to_f64_vec().iter().all(|&x| x == 0.0 || x == 1.0));
}

// ------------------------------------------------------- write and read back

fn every_dtype() -> TensorMap {
    let mut map = TensorMap::new();
    let mut add = |name: &str, t: HostTensor| map.insert(name.to_string(), t);
    add(
        "f64",
        HostTensor::f64(
            vec![2, 3],
            vec![1.0, -2.5, 1e-310, f64::MAX, f64::INFINITY, -0.0],
        ),
    );
    add("f32", HostTensor::f32(vec![3], vec![0.1, -3.0e38, 1e-45]));
    add("i64", HostTensor::i64(vec![3], vec![i64::MIN, 0, i64::MAX]));
    add(
        "bool",
        HostTensor::bool(vec![2, 2], vec![true, false, false, true]),
    );
    add("scalar.f64", HostTensor::f64(vec![], vec![42.5]));
    add("scalar.f32", HostTensor::f32(vec![], vec![-1.5]));
    add("scalar.i64", HostTensor::i64(vec![], vec![-7]));
    add("scalar.bool", HostTensor::bool(vec![], vec![true]));
    add("empty.f64", HostTensor::f64(vec![0, 3], vec![]));
    add("empty.f32", HostTensor::f32(vec![0, 3], vec![]));
    add("empty.i64", HostTensor::i64(vec![0, 3], vec![]));
    add("empty.bool", HostTensor::bool(vec![3, 0], vec![]));
    map
}

#[test]
fn round_trips_every_dtype() {
    let dir = scratch_dir("round_trip");
    let path = dir.join("all.safetensors");
    let original = every_dtype();
    write_safetensors(&path, &original).unwrap();
    let back = read_tensors(&path).unwrap();
    assert_eq!(back, original);
    // -0.0 == 0.0, so check the sign bit survived explicitly.
    assert!(back["f64"].to_f64_vec()[5].is_sign_negative());
}

#[test]
fn round_trip_keeps_nan_bits() {
    let dir = scratch_dir("nan_bits");
    let path = dir.join("nan.safetensors");
    let nan = f64::from_bits(0x7ff8_0000_dead_beef);
    let map = TensorMap::from([("x".to_string(), HostTensor::f64(vec![2], vec![1.0, nan]))]);
    write_safetensors(&path, &map).unwrap();
    let back = read_tensors(&path).unwrap();
    assert_eq!(back["x"].first_non_finite(), Some(1));
    assert_eq!(back["x"].to_f64_vec()[1].to_bits(), nan.to_bits());
}

#[test]
fn write_is_atomic_and_overwrites() {
    let dir = scratch_dir("atomic");
    let path = dir.join("out.safetensors");
    write_safetensors(&path, &every_dtype()).unwrap();
    let small = TensorMap::from([("only".to_string(), HostTensor::i64(vec![1], vec![5]))]);
    write_safetensors(&path, &small).unwrap();
    assert_eq!(read_tensors(&path).unwrap(), small);
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["out.safetensors".to_string()]);
}

#[test]
fn writing_an_empty_map_gives_a_readable_file() {
    let dir = scratch_dir("empty_map");
    let path = dir.join("none.safetensors");
    write_safetensors(&path, &TensorMap::new()).unwrap();
    assert!(read_tensors(&path).unwrap().is_empty());
}

#[test]
fn written_header_is_standard_safetensors() {
    // What the Python library reads: u64 LE header length, JSON header with
    // dtype/shape/data_offsets, then the raw little-endian bytes.
    let dir = scratch_dir("header");
    let path = dir.join("h.safetensors");
    let map = TensorMap::from([
        ("a".to_string(), HostTensor::f32(vec![2], vec![1.0, 2.0])),
        ("b".to_string(), HostTensor::bool(vec![1], vec![true])),
    ]);
    write_safetensors(&path, &map).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["a"]["dtype"], "F32");
    assert_eq!(header["a"]["shape"], json!([2]));
    assert_eq!(header["b"]["dtype"], "BOOL");
    let [start, end] = [0, 1].map(|i| header["a"]["data_offsets"][i].as_u64().unwrap() as usize);
    let data = &bytes[8 + n + start..8 + n + end];
    assert_eq!(data, [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
}

#[test]
fn writing_into_a_missing_directory_fails_cleanly() {
    let dir = scratch_dir("missing_dir");
    let path = dir.join("no/such/folder/out.safetensors");
    let err = write_safetensors(&path, &every_dtype()).unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("cannot write `"), "{text}");
    assert!(text.contains("out.safetensors"), "{text}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

// ------------------------------------------------------------ broken files

#[test]
fn truncated_file_is_an_error_naming_the_path() {
    let bytes = std::fs::read(fixture("mnrl_pairs_cos_s20_b8_d16.safetensors")).unwrap();
    let half = &bytes[..bytes.len() / 2];
    let err = read_safetensors_bytes(half, "cut.safetensors").unwrap_err();
    assert_eq!(err.path, "cut.safetensors");
    let text = err.to_string();
    assert!(text.contains("cut.safetensors"), "{text}");
    assert!(text.contains("truncated or corrupt"), "{text}");

    let dir = scratch_dir("truncated");
    let path = dir.join("cut.safetensors");
    std::fs::write(&path, half).unwrap();
    let text = read_tensors(&path).unwrap_err().to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn header_only_prefix_is_an_error() {
    let bytes = std::fs::read(fixture("mnrl_pairs_cos_s20_b8_d16.safetensors")).unwrap();
    for cut in [0, 3, 8, 20, bytes.len() - 1] {
        assert!(
            read_safetensors_bytes(&bytes[..cut], "p").is_err(),
            "cut at {cut}"
        );
    }
}

#[test]
fn garbage_bytes_are_an_error() {
    let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 251) as u8).collect();
    assert!(read_safetensors_bytes(&garbage, "g.safetensors").is_err());
    let mut plausible = 16u64.to_le_bytes().to_vec();
    plausible.extend_from_slice(b"{not json at all");
    assert!(read_safetensors_bytes(&plausible, "g.safetensors").is_err());
}

#[test]
fn missing_file_is_an_error() {
    let path = scratch_dir("missing").join("absent.safetensors");
    let err = read_tensors(&path).unwrap_err();
    assert!(err.to_string().starts_with("cannot read `"), "{err}");
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}

#[test]
fn unknown_extension_names_the_supported_ones() {
    let err = read_tensors(Path::new("weights.pt")).unwrap_err();
    for ext in [".safetensors", ".npz", ".npy", ".json"] {
        assert!(err.message.contains(ext), "{err}");
    }
}

#[test]
fn error_display_names_file_and_tensor() {
    let err = IoError {
        path: "x.safetensors".to_string(),
        tensor: Some("input.anchor".to_string()),
        message: "unsupported dtype U64".to_string(),
    };
    assert_eq!(
        err.to_string(),
        "cannot read `x.safetensors`: tensor `input.anchor`: unsupported dtype U64"
    );
}

// ------------------------------------------------ hand-built safetensors

#[test]
fn f16_and_bf16_convert_to_f32() {
    let f16 = [
        0x3c00, 0xc100, 0x0000, 0x8000, 0x0001, 0x03ff, 0x7c00, 0xfc00, 0x7bff,
    ];
    let bf16 = [0x3f80, 0xc020, 0x0000, 0x0001, 0x7f80, 0xff80];
    let bytes = hand_built_safetensors(&[
        ("half", "F16", &[9], u16_bytes(&f16)),
        ("brain", "BF16", &[2, 3], u16_bytes(&bf16)),
    ]);
    let tensors = read_safetensors_bytes(&bytes, "h.safetensors").unwrap();
    let expected_f16 = [
        1.0,
        -2.5,
        0.0,
        -0.0,
        2f32.powi(-24),
        1023.0 * 2f32.powi(-24),
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
    ];
    let got: Vec<u32> = f32_data(&tensors["half"])
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u32> = expected_f16.iter().map(|x| x.to_bits()).collect();
    assert_eq!(got, want);
    let brain = &tensors["brain"];
    assert_eq!(brain.shape, vec![2, 3]);
    // 0x0001 is the f32 subnormal 2^-133; built from bits because
    // `powi(-133)` in f32 would underflow on the way.
    let subnormal = f32::from_bits(0x0001_0000);
    assert_eq!(f64::from(subnormal), 2f64.powi(-133));
    let expected_bf16 = [1.0, -2.5, 0.0, subnormal, f32::INFINITY, f32::NEG_INFINITY];
    assert_eq!(f32_data(brain), expected_bf16);
}

#[test]
fn every_f16_value_converts_exactly() {
    let all: Vec<u16> = (0..=u16::MAX).collect();
    let bytes = hand_built_safetensors(&[("all", "F16", &[all.len()], u16_bytes(&all))]);
    let tensors = read_safetensors_bytes(&bytes, "all.safetensors").unwrap();
    for (&bits, &got) in all.iter().zip(f32_data(&tensors["all"])) {
        let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
        let exponent = i32::from((bits >> 10) & 0x1f);
        let mantissa = f64::from(bits & 0x3ff);
        let want = match exponent {
            0 => sign * mantissa * 2f64.powi(-24),
            31 if mantissa == 0.0 => sign * f64::INFINITY,
            31 => f64::NAN,
            e => sign * (1024.0 + mantissa) * 2f64.powi(e - 25),
        };
        if want.is_nan() {
            assert!(got.is_nan(), "{bits:#06x}");
        } else {
            assert_eq!(f64::from(got), want, "{bits:#06x}");
            assert_eq!(got.is_sign_negative(), sign < 0.0, "{bits:#06x}");
        }
    }
}

#[test]
fn small_ints_widen_and_unaligned_data_decodes() {
    // U8 [3] first puts the F64 data at an odd offset.
    let f64_bytes: Vec<u8> = [1.5f64, -2.0]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let i32_bytes: Vec<u8> = [i32::MIN, 7].iter().flat_map(|x| x.to_le_bytes()).collect();
    let bytes = hand_built_safetensors(&[
        ("u8", "U8", &[3], vec![0, 200, 255]),
        ("f64", "F64", &[2], f64_bytes),
        ("i8", "I8", &[2], vec![0x80, 0x7f]),
        ("i32", "I32", &[2], i32_bytes),
        ("u16", "U16", &[1], u16_bytes(&[65535])),
        ("u32", "U32", &[], u32::MAX.to_le_bytes().to_vec()),
        ("i16", "I16", &[1], (-300i16).to_le_bytes().to_vec()),
        ("flags", "BOOL", &[2], vec![1, 0]),
    ]);
    let t = read_safetensors_bytes(&bytes, "mixed.safetensors").unwrap();
    assert_eq!(t["u8"], HostTensor::i64(vec![3], vec![0, 200, 255]));
    assert_eq!(t["f64"], HostTensor::f64(vec![2], vec![1.5, -2.0]));
    assert_eq!(t["i8"], HostTensor::i64(vec![2], vec![-128, 127]));
    assert_eq!(
        t["i32"],
        HostTensor::i64(vec![2], vec![i64::from(i32::MIN), 7])
    );
    assert_eq!(t["u16"], HostTensor::i64(vec![1], vec![65535]));
    assert_eq!(t["u32"], HostTensor::i64(vec![], vec![i64::from(u32::MAX)]));
    assert_eq!(t["i16"], HostTensor::i64(vec![1], vec![-300]));
    assert_eq!(t["flags"], HostTensor::bool(vec![2], vec![true, false]));
}

#[test]
fn unsupported_dtype_names_tensor_and_dtype() {
    for dtype in ["U64", "F8_E4M3", "C64"] {
        let size = if dtype == "F8_E4M3" { 1 } else { 8 };
        let bytes = hand_built_safetensors(&[
            ("fine", "F32", &[1], 1.0f32.to_le_bytes().to_vec()),
            ("odd", dtype, &[2], vec![0; 2 * size]),
        ]);
        let err = read_safetensors_bytes(&bytes, "u.safetensors").unwrap_err();
        assert_eq!(err.tensor.as_deref(), Some("odd"), "{err}");
        assert!(err.message.contains(dtype), "{err}");
        assert!(err.to_string().contains("u.safetensors"), "{err}");
    }
}

#[test]
fn invalid_bool_byte_is_an_error() {
    let bytes = hand_built_safetensors(&[("b", "BOOL", &[2], vec![1, 2])]);
    let err = read_safetensors_bytes(&bytes, "b.safetensors").unwrap_err();
    assert_eq!(err.tensor.as_deref(), Some("b"));
}

// -------------------------------------------------------------------- JSON

fn json(text: &str) -> Result<TensorMap, IoError> {
    read_json_str(text, "t.json")
}

#[test]
fn json_nested_arrays_infer_dtype() {
    let t = json(
        r#"{"ints": [[1, 2, 3], [4, 5, 6]], "floats": [[1.0, 2], [3, 4.5]],
            "exp": [1e2], "flags": [true, false], "big": [18446744073709551615]}"#,
    )
    .unwrap();
    assert_eq!(
        t["ints"],
        HostTensor::i64(vec![2, 3], vec![1, 2, 3, 4, 5, 6])
    );
    assert_eq!(
        t["floats"],
        HostTensor::f64(vec![2, 2], vec![1.0, 2.0, 3.0, 4.5])
    );
    assert_eq!(t["exp"], HostTensor::f64(vec![1], vec![100.0]));
    assert_eq!(t["flags"], HostTensor::bool(vec![2], vec![true, false]));
    assert_eq!(t["big"].dtype_name(), "f64");
}

#[test]
fn json_scalars_and_empty_arrays() {
    let t =
        json(r#"{"a": 3.5, "b": -7, "c": true, "d": [], "e": [[], []], "f": [[[1]]]}"#).unwrap();
    assert_eq!(t["a"], HostTensor::f64(vec![], vec![3.5]));
    assert_eq!(t["b"], HostTensor::i64(vec![], vec![-7]));
    assert_eq!(t["c"], HostTensor::bool(vec![], vec![true]));
    assert_eq!(t["d"], HostTensor::f64(vec![0], vec![]));
    assert_eq!(t["e"], HostTensor::f64(vec![2, 0], vec![]));
    assert_eq!(t["f"], HostTensor::i64(vec![1, 1, 1], vec![1]));
}

#[test]
fn json_shape_data_form() {
    let t = json(
        r#"{"x": {"shape": [2, 2], "data": [1, 2, 3, 4], "dtype": "f32"},
            "y": {"shape": [3], "data": [1, 2, 3]},
            "z": {"shape": [], "data": [0.25]},
            "w": {"shape": [2], "data": [1, 0], "dtype": "f64"},
            "b": {"data": [true], "shape": [1, 1], "dtype": "bool"},
            "e": {"shape": [0, 4], "data": []}}"#,
    )
    .unwrap();
    assert_eq!(
        t["x"],
        HostTensor::f32(vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])
    );
    assert_eq!(t["y"], HostTensor::i64(vec![3], vec![1, 2, 3]));
    assert_eq!(t["z"], HostTensor::f64(vec![], vec![0.25]));
    assert_eq!(t["w"], HostTensor::f64(vec![2], vec![1.0, 0.0]));
    assert_eq!(t["b"], HostTensor::bool(vec![1, 1], vec![true]));
    assert_eq!(t["e"], HostTensor::f64(vec![0, 4], vec![]));
}

fn json_error(text: &str) -> IoError {
    match json(text) {
        Ok(map) => panic!("expected an error, got {map:?}"),
        Err(e) => e,
    }
}

#[test]
fn json_ragged_arrays_name_tensor_and_position() {
    let err = json_error(r#"{"ok": [1], "bad": [[1, 2], [3]]}"#);
    assert_eq!(err.tensor.as_deref(), Some("bad"));
    assert!(err.message.contains("`[1]`"), "{err}");

    let err = json_error(r#"{"deep": [[[1], [2]], [[3], [4, 5]]]}"#);
    assert!(err.message.contains("`[1][1]`"), "{err}");
    let err = json_error(r#"{"deep": [[1, 2], 3]}"#);
    assert!(err.message.contains("`[1]`"), "{err}");
    let err = json_error(r#"{"deep": [[1, [2]], [3, 4]]}"#);
    assert!(err.message.contains("`[0][1]`"), "{err}");
    assert!(err.to_string().contains("t.json"), "{err}");
}

#[test]
fn json_non_numeric_values_are_errors() {
    for (text, tensor) in [
        (r#"{"s": "hello"}"#, "s"),
        (r#"{"s": [1, "2"]}"#, "s"),
        (r#"{"n": null}"#, "n"),
        (r#"{"n": [1, null]}"#, "n"),
        (r#"{"m": [1, true]}"#, "m"),
        (r#"{"o": {"shape": [2], "data": [1, 2, 3]}}"#, "o"),
        (r#"{"o": {"shape": [2], "data": [[1], [2]]}}"#, "o"),
        (
            r#"{"o": {"shape": [1], "data": [1.5], "dtype": "i64"}}"#,
            "o",
        ),
        (
            r#"{"o": {"shape": [1], "data": [1], "dtype": "complex"}}"#,
            "o",
        ),
        (r#"{"o": {"shape": [-1], "data": []}}"#, "o"),
        (r#"{"o": {"shape": [1], "data": [1], "units": "m"}}"#, "o"),
        (r#"{"o": {"data": [1]}}"#, "o"),
        (
            r#"{"o": {"shape": [1], "data": [1e300], "dtype": "f32"}}"#,
            "o",
        ),
    ] {
        let err = json_error(text);
        assert_eq!(err.tensor.as_deref(), Some(tensor), "{text}: {err}");
    }
}

#[test]
fn json_file_level_errors() {
    for text in ["[1, 2]", "3", "{\"a\": [1,", ""] {
        let err = json_error(text);
        assert_eq!(err.tensor, None, "{text}: {err}");
        assert_eq!(err.path, "t.json");
    }
}

#[test]
fn json_files_are_read_by_extension() {
    let dir = scratch_dir("json_file");
    let path = dir.join("in.JSON");
    std::fs::write(&path, r#"{"x": [1.5, 2.5]}"#).unwrap();
    let t = read_tensors(&path).unwrap();
    assert_eq!(t["x"], HostTensor::f64(vec![2], vec![1.5, 2.5]));
}

// ------------------------------------------------------------------- NumPy

#[test]
fn npz_round_trip_through_ndarray_npy() {
    let dir = scratch_dir("npz");
    for (file, compressed) in [("plain.npz", false), ("packed.npz", true)] {
        let path = dir.join(file);
        let out = std::fs::File::create(&path).unwrap();
        let mut npz = if compressed {
            NpzWriter::new_compressed(out)
        } else {
            NpzWriter::new(out)
        };
        let a = Array2::from_shape_vec((2, 3), vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        npz.add_array("a", &a).unwrap();
        npz.add_array("b", &Array1::from(vec![0.5f32, -1.0]))
            .unwrap();
        npz.add_array(
            "c",
            &Array2::from_shape_vec((2, 2), vec![1i64, -2, 3, 4]).unwrap(),
        )
        .unwrap();
        npz.add_array("d", &Array1::from(vec![true, false, true]))
            .unwrap();
        npz.add_array("e", &Array1::from(vec![7i32, -8])).unwrap();
        npz.add_array("f", &arr0(2.5f64)).unwrap();
        npz.finish().unwrap();

        // The writer stores members as `<name>.npy`, as numpy.savez does; the
        // reader must strip the suffix again.
        let t = read_tensors(&path).unwrap();
        let names: Vec<&str> = t.keys().map(String::as_str).collect();
        assert_eq!(names, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(
            t["a"],
            HostTensor::f64(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        );
        assert_eq!(t["b"], HostTensor::f32(vec![2], vec![0.5, -1.0]));
        assert_eq!(t["c"], HostTensor::i64(vec![2, 2], vec![1, -2, 3, 4]));
        assert_eq!(t["d"], HostTensor::bool(vec![3], vec![true, false, true]));
        assert_eq!(t["e"], HostTensor::i64(vec![2], vec![7, -8]));
        assert_eq!(t["f"], HostTensor::f64(vec![], vec![2.5]));
    }
}

#[test]
fn npy_is_named_after_the_file_stem_and_fortran_order_comes_out_c_order() {
    let dir = scratch_dir("npy");
    let path = dir.join("weights.npy");
    // [[1, 2, 3], [4, 5, 6]] transposed is a Fortran-order [3, 2] array.
    let a = Array2::from_shape_vec((2, 3), vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let fortran = a.reversed_axes();
    assert!(!fortran.is_standard_layout());
    fortran
        .write_npy(std::fs::File::create(&path).unwrap())
        .unwrap();
    let t = read_tensors(&path).unwrap();
    assert_eq!(
        t["weights"],
        HostTensor::f64(vec![3, 2], vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0])
    );
}

#[test]
fn npy_unsupported_dtype_names_the_tensor() {
    let dir = scratch_dir("npy_u64");
    let path = dir.join("big.npy");
    Array1::from(vec![1u64, 2])
        .write_npy(std::fs::File::create(&path).unwrap())
        .unwrap();
    let err = read_tensors(&path).unwrap_err();
    assert_eq!(err.tensor.as_deref(), Some("big"));
    assert!(err.message.contains("unsupported dtype"), "{err}");
    assert!(
        err.message.contains("u8"),
        "numpy descriptor <u8 expected: {err}"
    );
}

#[test]
fn broken_numpy_files_are_errors() {
    let dir = scratch_dir("npy_broken");
    let path = dir.join("x.npy");
    let a = ArrayD::from_shape_vec(IxDyn(&[4]), vec![1.0f64, 2.0, 3.0, 4.0]).unwrap();
    a.write_npy(std::fs::File::create(&path).unwrap()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = read_tensors(&path).unwrap_err();
    assert_eq!(err.tensor.as_deref(), Some("x"), "{err}");

    let npz = dir.join("y.npz");
    std::fs::write(&npz, b"PK\x03\x04 this is not a zip").unwrap();
    let err = read_tensors(&npz).unwrap_err();
    assert!(err.to_string().contains("y.npz"), "{err}");
}

// -------------------------------------------------------------- HostTensor

#[test]
fn host_tensor_helpers() {
    let t = HostTensor::f32(vec![2, 2], vec![1.0, f32::NAN, 3.0, f32::INFINITY]);
    assert_eq!(t.first_non_finite(), Some(1));
    assert!(t.is_float() && !t.is_int());
    assert_eq!((t.len(), t.is_empty(), t.dtype_name()), (4, false, "f32"));
    let b = HostTensor::bool(vec![3], vec![true, false, true]);
    assert_eq!(b.to_f64_vec(), vec![1.0, 0.0, 1.0]);
    assert_eq!(b.first_non_finite(), None);
    assert!(!b.is_float() && !b.is_int());
    let i = HostTensor::i64(vec![2], vec![-3, 4]);
    assert_eq!(i.to_f64_vec(), vec![-3.0, 4.0]);
    assert_eq!(i.first_non_finite(), None);
    let e = HostTensor::f64(vec![0, 5], vec![]);
    assert!(e.is_empty());
    assert_eq!(HostTensor::f64(vec![], vec![1.0]).len(), 1);
}

#[test]
#[should_panic]
fn host_tensor_constructor_panics_on_length_mismatch() {
    let _ = HostTensor::f64(vec![2, 3], vec![1.0]);
}
