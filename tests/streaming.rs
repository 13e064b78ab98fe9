//! The JIT's lean runs — outputs and gradients only, buffers freed after
//! their last reader, kernels split across threads, in-batch matrices
//! streamed in blocks of rows — agree with the interpreter on every library
//! loss, and the in-batch losses really stream: no `[B, N]` matrix is
//! materialised.

mod common;
use common::*;
use lossc::bind::{self, Bound};
use lossc::interp::{self, Real, Tensor};
use lossc::ir::{Graph, NodeKind};
use lossc::jit::{self, JitProgram, Precision, RunOptions, Streaming};
use std::collections::{BTreeMap, BTreeSet};

/// The loss and every gradient tensor of an evaluation, as f64.
fn results<F: Real>(graph: &Graph, e: &interp::Evaluation<F>) -> Vec<(String, Vec<f64>)> {
    let mut out: Vec<(String, Vec<f64>)> = e
        .outputs
        .iter()
        .map(|(n, x)| (n.clone(), vec![x.to_f64().unwrap_or(f64::NAN)]))
        .collect();
    for (name, id) in &graph.grads {
        if let Tensor::F(a) = &e.values[id.index()] {
            out.push((
                format!("grad.{name}"),
                a.iter().map(|x| x.to_f64().unwrap_or(f64::NAN)).collect(),
            ));
        }
    }
    out
}

/// Worst relative difference, each element scaled by the larger of itself
/// and `floor` times the tensor's largest; an error when NaN patterns or
/// lengths differ.
fn worst(
    want: &[(String, Vec<f64>)],
    got: &[(String, Vec<f64>)],
    floor: f64,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    for ((wn, w), (gn, g)) in want.iter().zip(got) {
        if wn != gn || w.len() != g.len() {
            return Err(format!("{wn}: {} values vs {gn}: {}", w.len(), g.len()));
        }
        let scale = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (a, b) in w.iter().zip(g) {
            if a.is_nan() || b.is_nan() {
                if a.is_nan() != b.is_nan() {
                    return Err(format!("{wn}: NaN mismatch ({a} vs {b})"));
                }
                continue;
            }
            if a.is_infinite() || b.is_infinite() {
                if a != b {
                    return Err(format!("{wn}: {a} vs {b}"));
                }
                continue;
            }
            let d = (a - b).abs() / a.abs().max(b.abs()).max(floor * scale).max(1e-300);
            worst = worst.max(d);
        }
    }
    if want.len() != got.len() {
        return Err("different outputs".into());
    }
    Ok(worst)
}

/// A class's first fixture case's parameters, with truncation dims that fit D = 5.
fn params_for(class: &str) -> lossc::Params {
    let mut params = first_case_params(class);
    if params.contains_key("matryoshka_dims") {
        params.insert("matryoshka_dims".into(), serde_json::json!([5, 4, 2]));
    }
    params
}

fn options(streaming: Streaming, tile_rows: Option<usize>, threads: usize) -> RunOptions {
    RunOptions {
        threads,
        streaming,
        tile_rows,
        lean: true,
    }
}

#[test]
fn lean_streamed_and_threaded_runs_agree_with_the_interpreter_on_every_library_loss() {
    let configs = [
        ("never, 2 threads", options(Streaming::Never, None, 2)),
        (
            "always, 1-row blocks",
            options(Streaming::Always, Some(1), 1),
        ),
        (
            "always, 4-row blocks, 2 threads",
            options(Streaming::Always, Some(4), 2),
        ),
        ("auto", RunOptions::lean()),
    ];
    let mut failures = Vec::new();
    let mut streamed_classes = BTreeSet::new();
    let mut runs = 0;
    let mut worst_f64 = 0.0f64;
    for class in library_classes() {
        let params = params_for(&class);
        let Ok(base) = compile_std(&class, &params) else {
            continue;
        };
        let columns = base.inputs().any(|(_, _, _, variadic)| variadic);
        let ks: &[i64] = if columns { &[0, 2] } else { &[1] };
        for &k in ks {
            for (n, b) in [1i64, 3, 17].into_iter().enumerate() {
                let Some((full, bound)) =
                    random_library_case(&class, &params, &base, (b, k), 11 + n as u64)
                else {
                    continue;
                };
                let Ok(want) = interp::evaluate::<f64>(&full, &bound) else {
                    continue; // a runtime error: covered by tests/jit.rs
                };
                let want = results(&full, &want);
                let program = match jit::compile(&full, Precision::F64) {
                    Ok(p) => p,
                    Err(e) => {
                        failures.push(format!("{class}: compile: {e}"));
                        continue;
                    }
                };
                for (label, opts) in configs {
                    runs += 1;
                    if !program
                        .schedule(&bound, opts)
                        .map(|s| s.is_empty())
                        .unwrap_or(true)
                    {
                        streamed_classes.insert(class.clone());
                    }
                    let got = match program.run_with::<f64>(&bound, opts) {
                        Ok(e) => results(&full, &e),
                        Err(d) => {
                            failures.push(format!("{class} B={b} K={k} {label}: {}", d.message));
                            continue;
                        }
                    };
                    match worst(&want, &got, 1e-6) {
                        Ok(w) if w <= 1e-9 => worst_f64 = worst_f64.max(w),
                        Ok(w) => failures.push(format!(
                            "{class} B={b} K={k} {label}: relative difference {w:e}"
                        )),
                        Err(e) => failures.push(format!("{class} B={b} K={k} {label}: {e}")),
                    }
                }
            }
        }
    }
    eprintln!(
        "streaming: {runs} lean runs, worst relative difference {worst_f64:e}; losses with a streamed pass: {streamed_classes:?}"
    );
    assert!(runs > 100, "only {runs} runs");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The in-batch losses stream (their score matrices are never whole).
    for class in IN_BATCH_LOSSES {
        assert!(
            streamed_classes.contains(*class),
            "{class} never streamed; streamed: {streamed_classes:?}"
        );
    }
}

/// The elements of the largest node a lean run keeps whole.
fn largest_whole(graph: &Graph, bound: &Bound, program: &JitProgram, opts: RunOptions) -> usize {
    let streamed: BTreeSet<_> = program
        .schedule(bound, opts)
        .expect("schedule")
        .into_iter()
        .flat_map(|p| p.streamed)
        .collect();
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, n)| {
            matches!(n.kind, NodeKind::Comp(_)) && !streamed.contains(&lossc::ir::NodeId(*i as u32))
        })
        .map(|(_, n)| {
            n.shape
                .iter()
                .map(|d| d.eval(&bound.sizes).unwrap_or(0) as usize)
                .product::<usize>()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn mnrl_at_a_large_batch_keeps_no_b_by_n_matrix_whole() {
    // B = 4096: each score-shaped f32 matrix would be 64 MiB, above the
    // automatic threshold; D is small so the test stays fast.
    let (b, d) = (4096i64, 8i64);
    for (class, k) in [
        ("MultipleNegativesRankingLoss", 1i64),
        ("MultipleNegativesSymmetricRankingLoss", 0),
        ("CachedMultipleNegativesRankingLoss", 0),
    ] {
        let params = params_for(class);
        let base = compile_std(class, &params).expect("compiles");
        let dims: BTreeMap<String, i64> = [("B", b), ("D", d), ("K", k)]
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .filter(|(n, _)| base.dim_names().contains(n))
            .collect();
        let tensors = bind::random_inputs(&base, 3, &dims).expect("inputs");
        let graph = compile_std_for(class, &params, &tensors).expect("compiles");
        let full = lossc::differentiate(&graph).0;
        let bound = bind::bind(&full, &tensors).expect("binds");
        let program = jit::compile(&full, Precision::F32).expect("jit");
        let opts = RunOptions::lean();
        let passes = program.schedule(&bound, opts).expect("schedule");
        assert!(!passes.is_empty(), "{class}: nothing streamed");
        let whole = largest_whole(&full, &bound, &program, opts);
        let docs = (b * (k + 1)) as usize;
        assert!(
            whole <= docs * d as usize,
            "{class}: a node of {whole} elements is kept whole (inputs are {docs}×{d})"
        );
        for p in &passes {
            assert!(
                p.tile_rows < p.rows,
                "{class}: one block is the whole matrix"
            );
        }
        // And the streamed run's values are the unstreamed run's.
        let never = RunOptions {
            streaming: Streaming::Never,
            ..opts
        };
        let a = program.run_with::<f32>(&bound, opts).expect("streamed run");
        let z = program.run_with::<f32>(&bound, never).expect("whole run");
        // f32 sums of 4096 terms in another order: relative to each
        // tensor's largest element.
        let w = worst(&results(&full, &z), &results(&full, &a), 1.0).expect("same outputs");
        assert!(w <= 1e-4, "{class}: streamed vs whole differ by {w:e}");
        eprintln!(
            "{class} B={b}: {} pass(es), tile {} rows, largest whole node {whole} elements, streamed vs whole {w:.1e}",
            passes.len(),
            passes[0].tile_rows
        );
    }
}

/// A library loss's forward-plus-gradient graph, bound to seeded random
/// inputs of these dims (those the loss has).
fn random_case(class: &str, dims: &[(&str, i64)], seed: u64) -> (Graph, Bound) {
    let params = params_for(class);
    let base = compile_std(class, &params).expect("compiles");
    let dims: BTreeMap<String, i64> = dims
        .iter()
        .map(|(n, v)| (n.to_string(), *v))
        .filter(|(n, _)| base.dim_names().contains(n))
        .collect();
    let tensors = bind::random_inputs(&base, seed, &dims).expect("inputs");
    let graph = compile_std_for(class, &params, &tensors).expect("compiles");
    let full = lossc::differentiate(&graph).0;
    let bound = bind::bind(&full, &tensors).expect("binds");
    (full, bound)
}

#[test]
fn an_odd_batch_of_1023_streams_in_uneven_blocks_and_agrees() {
    // 1023 rows in blocks of 100: ten full blocks and a short one.
    for (class, k) in [("MultipleNegativesRankingLoss", 1i64), ("CoSENTLoss", 0)] {
        let (full, bound) = random_case(class, &[("B", 1023), ("D", 3), ("K", k)], 5);
        let want = results(
            &full,
            &interp::evaluate::<f64>(&full, &bound).expect("interp"),
        );
        let program = jit::compile(&full, Precision::F64).expect("jit");
        for opts in [
            options(Streaming::Always, Some(100), 2),
            options(Streaming::Never, None, 2),
        ] {
            let got = results(
                &full,
                &program.run_with::<f64>(&bound, opts).expect("jit run"),
            );
            let w = worst(&want, &got, 1e-6).expect("same outputs");
            assert!(w <= 1e-9, "{class} {opts:?}: relative difference {w:e}");
        }
    }
}

/// The contractions of a streamed pass split across threads: each block of
/// score rows (`A_tile · Pᵀ`, and the anchor gradient `G_tile · P`) and each
/// block's terms added into the candidates' gradient (`G_tileᵀ · A_tile`,
/// accumulated over blocks) run as uneven blocks of output rows on three
/// threads, in f64 and f32; both agree with the interpreter in their
/// precision.
#[test]
fn streamed_contractions_split_their_rows_across_threads_and_agree() {
    let (full, bound) = random_case(
        "MultipleNegativesRankingLoss",
        &[("B", 300), ("D", 128), ("K", 1)],
        9,
    );
    let want = results(
        &full,
        &interp::evaluate::<f64>(&full, &bound).expect("interp"),
    );
    // 64-row blocks: every contraction's block holds 64 · 600 · 128 ≈ 4.9 M
    // multiply-adds, enough to split across the threads.
    let opts = options(Streaming::Always, Some(64), 3);
    let program = jit::compile(&full, Precision::F64).expect("jit");
    let got = results(&full, &program.run_with::<f64>(&bound, opts).expect("run"));
    let w = worst(&want, &got, 1e-6).expect("same outputs");
    assert!(w <= 1e-9, "f64: relative difference {w:e}");
    // f32 against the interpreter in f32: only summation orders differ.
    let want = results(
        &full,
        &interp::evaluate::<f32>(&full, &bound).expect("interp"),
    );
    let program = jit::compile(&full, Precision::F32).expect("jit");
    let got = results(&full, &program.run_with::<f32>(&bound, opts).expect("run"));
    // Elements below a tenth of their tensor's largest are compared at that
    // scale: the gradients are sums of 600 terms of both signs, whose f32
    // rounding is absolute (about 1e-5 of the largest element here).
    let w = worst(&want, &got, 0.1).expect("same outputs");
    assert!(w <= 1e-4, "f32: relative difference {w:e}");
}

/// `Auto` keeps a region whole when streaming it would recompute a streamed
/// node in several passes and every streamed node is below the CPU budget's
/// 256 MiB: BatchHardTripletLoss streams its distances in three passes at
/// B = 4096 only when forced, and on its own from B = 8192 (256 MiB per
/// f32 matrix). MNRL's single pass still streams at 4096.
#[test]
fn auto_keeps_recomputed_regions_whole_below_the_budget() {
    let passes = |class: &str, b: i64, streaming: Streaming| {
        let (full, bound) = random_case(class, &[("B", b), ("D", 2), ("K", 0)], 7);
        let program = jit::compile(&full, Precision::F32).expect("jit");
        let opts = RunOptions {
            streaming,
            ..RunOptions::lean()
        };
        let passes = program.schedule(&bound, opts).expect("schedule");
        let most = passes
            .iter()
            .flat_map(|p| p.streamed.iter())
            .map(|id| passes.iter().filter(|p| p.streamed.contains(id)).count())
            .max()
            .unwrap_or(0);
        (passes.len(), most)
    };
    let (forced, computed) = passes("BatchHardTripletLoss", 4096, Streaming::Always);
    assert!(
        forced > 1 && computed > 1,
        "forced: {forced} passes, a node in {computed}"
    );
    assert_eq!(passes("BatchHardTripletLoss", 4096, Streaming::Auto).0, 0);
    assert!(passes("BatchHardTripletLoss", 8192, Streaming::Auto).0 > 1);
    assert_eq!(
        passes("MultipleNegativesRankingLoss", 4096, Streaming::Auto),
        (1, 1)
    );
}
