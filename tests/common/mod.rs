//! Shared helpers for the integration tests: the fixture manifest, compiling
//! a standard-library loss with a case's parameters, and evaluating it.
#![allow(dead_code)]

use lossc::elab::Program;
use lossc::tensor_io::{read_tensors, TensorMap};
use lossc::{bind, interp, ir, Params};
use std::path::{Path, PathBuf};

/// `tests/fixtures` of this checkout; `LOSSC_REPO` overrides the checkout
/// (test binaries built elsewhere and copied along, as scripts/gpu-check.sh
/// runs them).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("LOSSC_REPO") {
        Some(repo) => PathBuf::from(repo).join("tests/fixtures"),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
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

/// Compiles a standard-library loss for the tensors it will run on (their
/// shapes pick optional inputs and shape alternatives).
pub fn compile_std_for(
    class: &str,
    params: &Params,
    tensors: &TensorMap,
) -> Result<ir::Graph, String> {
    let program = Program::new();
    let (file, decl) =
        lossc::select_loss(&program, None, Some(class)).map_err(|d| d.render(&program.sources))?;
    lossc::compile_for(
        &program,
        file,
        decl,
        params,
        &lossc::Specialize {
            tensors: Some(tensors),
            ..Default::default()
        },
    )
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

/// The gradient tensors (`name` → values as f64) of a graph on fixture tensors.
pub fn grads_of<F: lossc::interp::Real>(
    graph: &ir::Graph,
    tensors: &TensorMap,
) -> Result<(f64, Vec<(String, Vec<usize>, Vec<f64>)>), String> {
    let (with_grads, _) = lossc::differentiate(graph);
    ir::verify::verify(&with_grads).map_err(|e| format!("verifier: {e}"))?;
    let bound = bind::bind(&with_grads, tensors).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let eval = interp::evaluate::<F>(&with_grads, &bound).map_err(|d| d.to_string())?;
    let loss = num_traits::ToPrimitive::to_f64(&eval.outputs[0].1).unwrap_or(f64::NAN);
    let grads = lossc::gradient_tensors(&with_grads, &bound, &eval)
        .into_iter()
        .map(|(k, t)| (k, t.shape.clone(), t.to_f64_vec()))
        .collect();
    Ok((loss, grads))
}

/// Compares a gradient with its reference: |got - want| <= rtol * (|want| + max|want|)
/// per element. With `by_row` (zero-vector cases), a zero row's gradient (of
/// order 1/eps) would dwarf the others, so each such outlier row is compared
/// against its own maximum, and the other rows against the largest ordinary
/// row. Returns the worst ratio of error to allowance (<= 1 passes).
pub fn grad_error(got: &[f64], want: &[f64], shape: &[usize], rtol: f64, by_row: bool) -> f64 {
    assert_eq!(got.len(), want.len());
    let row = if by_row && shape.len() >= 2 {
        shape[shape.len() - 1]
    } else {
        want.len().max(1)
    };
    let row_max: Vec<f64> = want
        .chunks(row)
        .map(|w| w.iter().fold(0.0f64, |m, x| m.max(x.abs())))
        .collect();
    let mut sorted = row_max.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let ordinary = row_max
        .iter()
        .copied()
        .filter(|m| *m <= 1e3 * median.max(1e-300))
        .fold(0.0f64, f64::max);
    let mut worst: f64 = 0.0;
    for (r, (g, w)) in got.chunks(row).zip(want.chunks(row)).enumerate() {
        let scale = row_max[r].max(ordinary);
        for (a, b) in g.iter().zip(w) {
            let allowed = rtol * (b.abs() + scale) + 1e-300;
            let err = (a - b).abs() / allowed;
            worst = worst.max(if err.is_nan() { f64::INFINITY } else { err });
        }
    }
    worst
}

/// Parameters from a JSON object literal (`"{}"` for the defaults).
pub fn params_of(json: &str) -> Params {
    serde_json::from_str::<serde_json::Value>(json)
        .unwrap_or_else(|e| panic!("params {json}: {e}"))
        .as_object()
        .cloned()
        .unwrap_or_else(|| panic!("params {json}: not an object"))
}

/// Tensors from a JSON object literal (write float data with a decimal
/// point: a list of JSON integers is read as an int tensor).
pub fn tensors_of(json: &str) -> TensorMap {
    lossc::tensor_io::read_json_str(json, "test").unwrap_or_else(|e| panic!("{e}"))
}

/// Central differences in f64 of the forward graph's loss with respect to
/// every float tensor of `tensors` (keyed as given, `input.` stripped, like
/// `grads_of`), one coordinate at a time with step `h`.
pub fn fd_grads(graph: &ir::Graph, tensors: &TensorMap, h: f64) -> Vec<(String, Vec<f64>)> {
    use lossc::tensor_io::HostTensor;
    let loss_at = |t: &TensorMap| -> f64 {
        eval64(graph, t).unwrap_or_else(|e| panic!("forward evaluation: {e}"))[0].1
    };
    let mut out = Vec::new();
    for (key, t) in tensors {
        if !t.is_float() {
            continue;
        }
        let x0 = t.to_f64_vec();
        let mut g = vec![0.0; x0.len()];
        for j in 0..x0.len() {
            let at = |d: f64| {
                let mut x = x0.clone();
                x[j] += d;
                let mut m = tensors.clone();
                m.insert(key.clone(), HostTensor::f64(t.shape.clone(), x));
                loss_at(&m)
            };
            g[j] = (at(h) - at(-h)) / (2.0 * h);
        }
        let name = key.strip_prefix("input.").unwrap_or(key).to_string();
        out.push((name, g));
    }
    out
}

/// Every standard-library loss class, sorted.
/// A library loss with its gradient on seeded random inputs of batch `b`,
/// `D = 5` and `K = k` (the dims `base`, the loss compiled with `params`,
/// has): `None` where the inputs cannot be drawn or bound.
pub fn random_library_case(
    class: &str,
    params: &Params,
    base: &ir::Graph,
    (b, k): (i64, i64),
    seed: u64,
) -> Option<(ir::Graph, lossc::bind::Bound)> {
    let dims: std::collections::BTreeMap<String, i64> = [("B", b), ("D", 5), ("K", k)]
        .into_iter()
        .map(|(d, v)| (d.to_string(), v))
        .filter(|(d, _)| base.dim_names().contains(d))
        .collect();
    let tensors = lossc::bind::random_inputs(base, seed, &dims).ok()?;
    let graph = compile_std_for(class, params, &tensors).ok()?;
    let full = lossc::differentiate(&graph).0;
    let bound = lossc::bind::bind(&full, &tensors).ok()?;
    Some((full, bound))
}

/// The library losses whose in-batch matrices every backend that streams
/// must stream.
pub const IN_BATCH_LOSSES: &[&str] = &[
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
    "CachedMultipleNegativesRankingLoss",
    "GISTEmbedLoss",
    "CachedGISTEmbedLoss",
    "MegaBatchMarginLoss",
];

pub fn library_classes() -> Vec<String> {
    let program = Program::new();
    let mut classes: Vec<String> = program
        .std_losses()
        .iter()
        .map(|(_, l)| l.name.name.clone())
        .collect();
    classes.sort();
    classes.dedup();
    classes
}

/// The parameters of a class's first fixture case (the defaults otherwise).
pub fn first_case_params(class: &str) -> Params {
    manifest()
        .into_iter()
        .find(|c| c.class == class)
        .map(|c| c.params)
        .unwrap_or_default()
}
