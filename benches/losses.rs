//! Forward + gradient of the benchmark losses on the JIT (and, at the small
//! size, the interpreter as the in-run baseline), plus the GEMM routine's
//! rate. Run with `cargo bench --bench losses`; filter with a name, e.g.
//! `cargo bench --bench losses -- mnrl/jit/medium`. Sizes follow
//! docs/perf.md: small B=32 D=384, medium B=256 D=768 (large sizes and the
//! memory figures come from `lossc bench`, one process per run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lossc::bind::{self, Bound};
use lossc::elab::Program;
use lossc::ir::Graph;
use lossc::jit::{self, JitProgram, Precision, RunOptions};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

/// The losses of docs/perf.md: (label, class, parameters, K).
fn cases() -> Vec<(&'static str, &'static str, serde_json::Value, i64)> {
    vec![
        (
            "mnrl",
            "MultipleNegativesRankingLoss",
            serde_json::json!({}),
            0,
        ),
        (
            "mnrl_hn",
            "MultipleNegativesRankingLoss",
            serde_json::json!({}),
            1,
        ),
        ("cosent", "CoSENTLoss", serde_json::json!({}), 0),
        ("triplet", "TripletLoss", serde_json::json!({}), 0),
        (
            "batch_hard",
            "BatchHardTripletLoss",
            serde_json::json!({}),
            0,
        ),
        ("cosine", "CosineSimilarityLoss", serde_json::json!({}), 0),
    ]
}

/// Matryoshka over MNRL, dims D, D/2, D/4, D/8.
fn matryoshka(d: i64) -> serde_json::Value {
    serde_json::json!({
        "loss": "MultipleNegativesRankingLoss",
        "matryoshka_dims": [d, d / 2, d / 4, d / 8],
    })
}

/// The optimised forward+gradient graph and seeded inputs bound to it.
fn prepare(class: &str, params: &serde_json::Value, b: i64, d: i64, k: i64) -> (Graph, Bound) {
    let program = Program::new();
    let (file, decl) = lossc::select_loss(&program, None, Some(class)).expect("a library loss");
    let params = params.as_object().cloned().unwrap_or_default();
    let base = lossc::compile(&program, file, decl, &params).expect("compiles");
    let dims: BTreeMap<String, i64> = [("B", b), ("D", d), ("K", k)]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .filter(|(n, _)| base.dim_names().contains(n))
        .collect();
    let tensors = bind::random_inputs(&base, 0, &dims).expect("random inputs");
    let spec = lossc::Specialize {
        tensors: Some(&tensors),
        ..Default::default()
    };
    let graph = lossc::compile_for(&program, file, decl, &params, &spec).expect("compiles");
    let full = lossc::differentiate(&graph).0;
    let bound = bind::bind(&full, &tensors).expect("binds");
    (full, bound)
}

fn losses(c: &mut Criterion) {
    let sizes = [("small", 32i64, 384i64), ("medium", 256, 768)];
    let mut all = cases();
    all.push((
        "matryoshka_mnrl",
        "MatryoshkaLoss",
        serde_json::Value::Null,
        0,
    ));
    for (label, class, params, k) in all {
        let mut group = c.benchmark_group(label);
        group
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        for (size, b, d) in sizes {
            let params = if class == "MatryoshkaLoss" {
                matryoshka(d)
            } else {
                params.clone()
            };
            let (full, bound) = prepare(class, &params, b, d, k);
            let program: JitProgram = jit::compile(&full, Precision::F32).expect("jit");
            let opts = RunOptions::lean();
            group.bench_function(BenchmarkId::new("jit", size), |bench| {
                bench.iter(|| {
                    let e = program.run_with::<f32>(&bound, opts).expect("runs");
                    black_box(lossc::gradient_tensors(&full, &bound, &e))
                })
            });
            if size == "small" {
                group.bench_function(BenchmarkId::new("interp", size), |bench| {
                    bench.iter(|| {
                        let e = lossc::interp::evaluate::<f32>(&full, &bound).expect("runs");
                        black_box(lossc::gradient_tensors(&full, &bound, &e))
                    })
                });
            }
        }
        group.finish();
    }
}

/// The GEMM the JIT calls for contractions, at the shapes MNRL needs:
/// GFLOP/s = 2·m·n·k / time (criterion reports the time).
fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("sgemm");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    for (m, n, k) in [(256usize, 256usize, 768usize), (1024, 1024, 1024)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut out = vec![0f32; m * n];
        group.throughput(criterion::Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(format!("matrixmultiply/{m}x{n}x{k}"), |bench| {
            bench.iter(|| {
                // SAFETY: a is m×k, b is k×n (read transposed), out is m×n.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        1,
                        k as isize,
                        0.0,
                        out.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                };
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, losses, gemm);
criterion_main!(benches);
