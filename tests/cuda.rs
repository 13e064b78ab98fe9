//! The CUDA backend. On every machine: the generated CUDA C of every standard
//! loss is pinned by snapshots, NVRTC compiles every kernel to PTX for sm_90
//! (no GPU needed; skipped with a reason when libnvrtc cannot be loaded,
//! unless `LOSSC_REQUIRE_NVRTC=1`, which CI sets), and `--backend cuda`
//! without a driver is a clear error. On a machine with a GPU: every fixture
//! case of every library loss agrees with the interpreter (loss, components
//! and every gradient, f32, relative 1e-4), skipped with a reason elsewhere.
//!
//! Update the snapshots after an intended change with `INSTA_UPDATE=always
//! cargo test --test cuda`, and read the diff before committing it.

mod common;
use common::*;
use lossc::bind;
use lossc::cuda::{self, Precision};
use std::process::Command;

/// The first fixture case of every class the library defines.
fn first_case_per_class() -> Vec<Case> {
    let program = lossc::elab::Program::new();
    let mut seen = std::collections::BTreeSet::new();
    manifest()
        .into_iter()
        .filter(|c| lossc::select_loss(&program, None, Some(&c.class)).is_ok())
        .filter(|c| seen.insert(c.class.clone()))
        .collect()
}

/// The forward+gradient program of a case's loss, specialised to its tensors.
fn full_graph(case: &Case) -> lossc::ir::Graph {
    let tensors = read_case(case);
    let graph = compile_std_for(&case.class, &case.params, &tensors)
        .unwrap_or_else(|e| panic!("{}: {e}", case.id));
    lossc::differentiate(&graph).0
}

fn nvrtc_or_skip(test: &str) -> bool {
    match cuda::nvrtc::load() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("LOSSC_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
                panic!("{test}: LOSSC_REQUIRE_NVRTC=1 but NVRTC cannot be used: {e}");
            }
            eprintln!("SKIP {test}: {e}");
            false
        }
    }
}

#[test]
fn generated_cuda_source_of_every_standard_loss() {
    let cases = first_case_per_class();
    assert!(cases.len() >= 25, "only {} classes", cases.len());
    for case in cases {
        let full = full_graph(&case);
        let source =
            cuda::source(&full, Precision::F32).unwrap_or_else(|e| panic!("{}: {e}", case.class));
        // One kernel per node that is not an input.
        let inputs = full.inputs().count();
        assert_eq!(
            source.kernels.len(),
            full.nodes.len() - inputs,
            "{}",
            case.class
        );
        insta::assert_snapshot!(format!("cuda_{}", case.class), source.text);
    }
}

#[test]
fn generation_is_deterministic_and_precision_specific() {
    let case = first_case_per_class()
        .into_iter()
        .find(|c| c.class == "MultipleNegativesRankingLoss")
        .expect("an MNRL case");
    let full = full_graph(&case);
    let a = cuda::source(&full, Precision::F32).unwrap();
    let b = cuda::source(&full, Precision::F32).unwrap();
    assert_eq!(a.text, b.text);
    let d = cuda::source(&full, Precision::F64).unwrap();
    assert!(a.text.contains("typedef float real;"));
    assert!(d.text.contains("typedef double real;"));
    // MNRL's scores are a contraction: a tiled kernel.
    assert!(a
        .kernels
        .iter()
        .any(|k| matches!(k.launch, cuda::codegen::Launch::Tiled { .. })));
    // Its loss is a mean to a scalar: a block reduction.
    assert!(a
        .kernels
        .iter()
        .any(|k| k.launch == cuda::codegen::Launch::Block));
}

#[test]
fn every_kernel_of_every_standard_loss_compiles_to_ptx_for_sm_90() {
    if !nvrtc_or_skip("NVRTC compile of every standard loss") {
        return;
    }
    let start = std::time::Instant::now();
    let cases = first_case_per_class();
    // Two threads: NVRTC is the slow part and CI has two cores.
    let failures = std::sync::Mutex::new(Vec::new());
    let kernels = std::sync::atomic::AtomicUsize::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let full = full_graph(case);
                // f32 for every loss, f64 too for the first few.
                let precisions: &[Precision] = if i < 4 {
                    &[Precision::F32, Precision::F64]
                } else {
                    &[Precision::F32]
                };
                for p in precisions {
                    let source = cuda::source(&full, *p).unwrap();
                    match cuda::nvrtc::compile(&source.text, "compute_90") {
                        Ok(ptx) => {
                            for k in &source.kernels {
                                if !ptx.contains(&format!(".entry {}(", k.name)) {
                                    failures.lock().unwrap().push(format!(
                                        "{} {}: no entry {} in the PTX",
                                        case.class,
                                        p.name(),
                                        k.name
                                    ));
                                }
                            }
                            kernels.fetch_add(
                                source.kernels.len(),
                                std::sync::atomic::Ordering::SeqCst,
                            );
                        }
                        Err(e) => failures.lock().unwrap().push(format!(
                            "{} {}: {e}",
                            case.class,
                            p.name()
                        )),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "nvrtc: {} kernels of {} losses compiled for compute_90 in {:.1} s",
        kernels.into_inner(),
        cases.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn nvrtc_reports_a_compile_error() {
    if !nvrtc_or_skip("NVRTC compile error") {
        return;
    }
    let err = cuda::nvrtc::compile(
        "extern \"C\" __global__ void k() { undeclared = 1; }",
        "compute_90",
    )
    .unwrap_err();
    assert!(err.contains("undeclared"), "{err}");
}

#[test]
fn ptx_cache_key_depends_on_source_options_and_version() {
    let k = |s: &str, o: &str, v: (u32, u32)| cuda::nvrtc::cache_key(s, &[o.to_string()], v);
    let base = k("a", "x", (13, 0));
    assert_eq!(base, k("a", "x", (13, 0)));
    assert_ne!(base, k("b", "x", (13, 0)));
    assert_ne!(base, k("a", "y", (13, 0)));
    assert_ne!(base, k("a", "x", (13, 1)));
    assert_eq!(base.len(), 32);
}

/// Relative agreement as the issue states it: |a - b| <= rtol * max(|a|, |b|, floor).
fn agree(a: f64, b: f64, rtol: f64, scale: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rtol * a.abs().max(b.abs()).max(1e-3 * scale).max(1e-30)
}

#[test]
fn gpu_every_fixture_case_agrees_with_the_interpreter() {
    if let Err(d) = cuda::device() {
        eprintln!("SKIP GPU agreement tests: {} ({})", d.message, d.code);
        return;
    }
    let program = lossc::elab::Program::new();
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in manifest() {
        if lossc::select_loss(&program, None, Some(&case.class)).is_err() {
            continue;
        }
        let tensors = read_case(&case);
        let Ok(graph) = compile_std_for(&case.class, &case.params, &tensors) else {
            continue;
        };
        let full = lossc::differentiate(&graph).0;
        let bound = match bind::bind(&full, &tensors) {
            Ok(b) => b,
            Err(d) => {
                failures.push(format!("{}: bind: {}", case.id, d[0].message));
                continue;
            }
        };
        let gpu = match cuda::compile(&full, Precision::F32) {
            Ok(p) => p,
            Err(d) => {
                failures.push(format!("{}: compile: {}", case.id, d.message));
                continue;
            }
        };
        ran += 1;
        let want = lossc::interp::evaluate::<f32>(&full, &bound);
        let got = gpu.run::<f32>(&bound);
        let (want, got) = match (want, got) {
            (Ok(w), Ok(g)) => (w, g),
            (Err(w), Err(g)) if w.code == g.code => continue,
            (w, g) => {
                failures.push(format!(
                    "{}: interp {:?} vs cuda {:?}",
                    case.id,
                    w.err().map(|d| d.message),
                    g.err().map(|d| d.message)
                ));
                continue;
            }
        };
        for ((name, w), (_, g)) in want.outputs.iter().zip(&got.outputs) {
            if !agree(f64::from(*g), f64::from(*w), 1e-4, 0.0) {
                failures.push(format!("{} {name}: cuda {g:e}, interp {w:e}", case.id));
            }
        }
        let gw = lossc::gradient_tensors(&full, &bound, &want);
        let gg = lossc::gradient_tensors(&full, &bound, &got);
        for ((name, w), (_, g)) in gw.iter().zip(&gg) {
            let (w, g) = (w.to_f64_vec(), g.to_f64_vec());
            let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            if let Some(k) = (0..w.len()).find(|&k| !agree(g[k], w[k], 1e-4, scale)) {
                failures.push(format!(
                    "{} grad.{name}[{k}]: cuda {:e}, interp {:e}",
                    case.id, g[k], w[k]
                ));
            }
        }
        // The output-only run gives the same loss and gradients.
        let lean = gpu.run_outputs::<f32>(&bound).expect("second run");
        if lean.outputs[0].1 != got.outputs[0].1 {
            failures.push(format!("{}: run_outputs differs from run", case.id));
        }
    }
    eprintln!("cuda: {ran} fixture cases ran on the GPU");
    assert!(ran > 0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gpu_out_of_range_label_is_a_diagnostic() {
    if let Err(d) = cuda::device() {
        eprintln!("SKIP GPU diagnostics test: {}", d.message);
        return;
    }
    let src =
        "loss L() {\n input x: [N]\n input idx: int[M]\n let y[m] = x[idx[m]]\n sum(m) y[m]\n}\n";
    let graph = compile_src(src, None, &lossc::Params::new()).unwrap();
    let tensors = tensors_of(r#"{"x": [1.0, 2.0], "idx": [0, 5]}"#);
    let bound = bind::bind(&graph, &tensors).unwrap();
    let gpu = cuda::compile(&graph, Precision::F32).unwrap();
    let err = gpu.run::<f32>(&bound).err().expect("an error");
    assert_eq!(err.code, "LC0506", "{}", err.message);
    assert!(err.message.contains("index 5"), "{}", err.message);
}

fn lossc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lossc"))
}

#[test]
fn cli_run_backend_cuda_without_a_driver_is_a_clear_error() {
    let out = lossc()
        .args([
            "run",
            "--loss",
            "CoSENTLoss",
            "--backend",
            "cuda",
            "--dtype",
            "f32",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if cuda::device().is_ok() {
        assert!(out.status.success(), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("backend cuda"));
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("LC0601"), "{stderr}");
    assert!(
        stderr.contains("no CUDA driver found") || stderr.contains("no usable CUDA device"),
        "{stderr}"
    );
    // bench says the same.
    let out = lossc()
        .args([
            "bench",
            "--loss",
            "CoSENTLoss",
            "--backend",
            "cuda",
            "--repeats",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("LC0601"), "{stderr}");
}

#[test]
fn cli_cuda_prints_the_kernels() {
    let out = lossc()
        .args(["cuda", "--loss", "MultipleNegativesRankingLoss"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("typedef float real;"), "{text}");
    assert!(
        text.contains("extern \"C\" __global__ void lossc_n"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kernels for"), "{stderr}");
    let f64_out = lossc()
        .args(["cuda", "--loss", "CoSENTLoss", "--dtype", "f64"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&f64_out.stdout).contains("typedef double real;"));
    let bad = lossc()
        .args(["cuda", "--loss", "NoSuchLoss"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
}
