//! Shared helpers for the integration tests: the fixture manifest, compiling
//! a standard-library loss with a case's parameters, and evaluating it.
#![allow(dead_code)]

use lossc::elab::Program;
use lossc::tensor_io::{read_tensors, TensorMap};
use lossc::{bind, interp, ir, Params};
use std::path::{Path, PathBuf};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub struct Case {
    pub id: String,
    pub class: String,
    pub params: Params,
    pub loss: f64,
    pub tags: Vec<String>,
    pub file: PathBuf,
}

pub fn manifest() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures_dir().join("manifest.json"))
        .expect("tests/fixtures/manifest.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("manifest is JSON");
    json["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            id: c["id"].as_str().unwrap().to_string(),
            class: c["st_class"].as_str().unwrap().to_string(),
            params: c["params"].as_object().cloned().unwrap_or_default(),
            loss: c["loss"].as_f64().unwrap(),
            tags: c["tags"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect(),
            file: fixtures_dir().join(c["file"].as_str().unwrap()),
        })
        .collect()
}

/// Compiles a standard-library loss by class name with the given parameters.
pub fn compile_std(class: &str, params: &Params) -> Result<ir::Graph, String> {
    let program = Program::new();
    let (file, decl) =
        lossc::select_loss(&program, None, Some(class)).map_err(|d| d.render(&program.sources))?;
    lossc::compile(&program, file, decl, params)
        .map_err(|d| lossc::syntax::diag::render_all(&d, &program.sources))
}

/// Compiles a loss from source text (the only loss of the text, or `name`).
pub fn compile_src(src: &str, name: Option<&str>, params: &Params) -> Result<ir::Graph, String> {
    let mut program = Program::new();
    let no_disk = |p: &Path| std::fs::read_to_string(p);
    let file = program.add_file("test.loss", None, src, &no_disk);
    let errors = program.load_errors(Some(file));
    if !errors.is_empty() {
        return Err(lossc::syntax::diag::render_all(&errors, &program.sources));
    }
    let (file, decl) =
        lossc::select_loss(&program, Some(file), name).map_err(|d| d.render(&program.sources))?;
    lossc::compile(&program, file, decl, params)
        .map_err(|d| lossc::syntax::diag::render_all(&d, &program.sources))
}

pub fn eval64(graph: &ir::Graph, tensors: &TensorMap) -> Result<Vec<(String, f64)>, String> {
    let bound = bind::bind(graph, tensors).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    interp::evaluate::<f64>(graph, &bound)
        .map(|e| e.outputs)
        .map_err(|d| d.to_string())
}

pub fn eval32(graph: &ir::Graph, tensors: &TensorMap) -> Result<Vec<(String, f64)>, String> {
    let bound = bind::bind(graph, tensors).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    interp::evaluate::<f32>(graph, &bound)
        .map(|e| e.outputs.into_iter().map(|(n, x)| (n, x as f64)).collect())
        .map_err(|d| d.to_string())
}

pub fn read_case(case: &Case) -> TensorMap {
    read_tensors(&case.file).unwrap_or_else(|e| panic!("{}: {e}", case.id))
}

/// |got - want| <= rtol * max(|want|, 1e-300); NaN never passes.
pub fn close(got: f64, want: f64, rtol: f64) -> bool {
    (got - want).abs() <= rtol * want.abs().max(1e-300)
}
