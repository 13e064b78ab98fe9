//! Optional inputs (`present`), shape alternatives (`form`), numbered columns
//! without an underscore (`sentence1..`), and integer floor division: the
//! loss is specialised to the shapes of the tensors it runs on.

mod common;
use common::*;
use lossc::tensor_io::{read_json_str, TensorMap};

const SRC: &str = r#"
loss Forms() {
    input x: [B, D]
    input g: [B, D]?
    input y: [B] | [B, D]
    input s: [C, B, D] = []
    let base = sum(i, k) x[i, k]
    let extra = if present(g) then sum(i, k) g[i, k] else 0
    let tail = match form(y) {
        0 => sum(i) y[i],
        _ => 100 * sum(i, k) y[i, k],
    }
    base + extra + tail + sum(c, i, k) s[c, i, k] + float(7 // 2)
}
"#;

fn run(json: &str) -> Result<f64, String> {
    let tensors: TensorMap = read_json_str(json, "t").map_err(|e| e.to_string())?;
    let mut program = lossc::elab::Program::new();
    let read = |p: &std::path::Path| std::fs::read_to_string(p);
    let file = program.add_file("forms.loss", None, SRC, &read);
    let (file, decl) = lossc::select_loss(&program, Some(file), None).map_err(|d| d.to_string())?;
    let graph = lossc::compile_for(
        &program,
        file,
        decl,
        &Default::default(),
        &lossc::Specialize {
            tensors: Some(&tensors),
            ..Default::default()
        },
    )
    .map_err(|d| lossc::syntax::diag::render_all(&d, &program.sources))?;
    Ok(eval64(&graph, &tensors)?[0].1)
}

#[test]
fn shapes_of_the_inputs_pick_the_program() {
    // x sums to 10, y (rank 1) to 3, floor(7/2) = 3, no g, no s columns.
    assert_eq!(
        run(r#"{"x": [[1.0, 2.0], [3.0, 4.0]], "y": [1.0, 2.0]}"#).unwrap(),
        16.0
    );
    // With g present (sum 1) and y of rank 2 (sum 1, times 100).
    let v = run(r#"{"x": [[1.0, 2.0], [3.0, 4.0]], "g": [[1.0, 0.0], [0.0, 0.0]], "y": [[1.0, 0.0], [0.0, 0.0]]}"#).unwrap();
    assert_eq!(v, 10.0 + 1.0 + 100.0 + 3.0);
    // Two columns named s1, s2 (sentence-transformers style), each summing to 1.
    let v = run(r#"{"x": [[1.0, 2.0], [3.0, 4.0]], "y": [0.0, 0.0], "s1": [[1.0, 0.0], [0.0, 0.0]], "s2": [[0.0, 1.0], [0.0, 0.0]]}"#).unwrap();
    assert_eq!(v, 10.0 + 2.0 + 3.0);
}

#[test]
fn a_tensor_that_fits_no_alternative_is_a_diagnostic() {
    let err = run(r#"{"x": [[1.0, 2.0], [3.0, 4.0]], "y": [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]}"#)
        .unwrap_err();
    assert!(
        err.contains("LC0503") && err.contains("fits none of [B] | [B, D]"),
        "{err}"
    );
}

#[test]
fn using_an_absent_input_is_a_diagnostic() {
    let src = "loss L() {\n    input x: [B]\n    input g: [B]?\n    sum(i) x[i] * g[i]\n}\n";
    let err = compile_src(src, None, &Default::default()).unwrap_err();
    assert!(
        err.contains("LC0501") && err.contains("present(g)"),
        "{err}"
    );
}
