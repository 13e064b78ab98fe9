//! The Cranelift backend agrees with the reference interpreter: on every
//! fixture case of every library loss (loss, every node's value and every
//! gradient tensor, f64 and f32, and the fixture references), on random
//! inputs of odd sizes, on the program suite, and on runtime errors
//! (out-of-range gather indices are LC0506 diagnostics, never a crash).

mod common;
use common::*;
use lossc::bind::{self, Bound};
use lossc::interp::{self, Evaluation, Real, Tensor};
use lossc::ir::Graph;
use lossc::jit::{self, JitProgram, Precision};
use lossc::tensor_io::TensorMap;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

thread_local! {
    /// Seconds spent in the interpreter and in `JitProgram::run`, per test thread.
    static TIMES: RefCell<(f64, f64)> = const { RefCell::new((0.0, 0.0)) };
}

fn times() -> String {
    TIMES.with(|t| {
        let t = t.borrow();
        format!(
            "interp {:.2} s, jit run {:.2} s (incl. a lazy compile of the other precision)",
            t.0, t.1
        )
    })
}

const RTOL_F64: f64 = 1e-12;
const RTOL_F32: f64 = 1e-5;

fn f64_of<F: Real>(x: F) -> f64 {
    x.to_f64().unwrap_or(f64::NAN)
}

/// `a` and `b` agree to `rtol` relative, scaled by the larger of the
/// element and a millionth of the tensor's largest element; NaN agrees with
/// NaN and infinities must be equal.
fn agree(a: f64, b: f64, rtol: f64, scale: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rtol * a.abs().max(b.abs()).max(1e-6 * scale).max(1e-300)
}

/// Every node's value and every output of two evaluations agree; returns
/// the worst relative difference seen.
fn compare<F: Real>(
    graph: &Graph,
    bound: &Bound,
    want: &Evaluation<F>,
    got: &Evaluation<F>,
    rtol: f64,
) -> Result<f64, String> {
    let mut worst = 0.0f64;
    for ((name, w), (gname, g)) in want.outputs.iter().zip(&got.outputs) {
        let (w, g) = (f64_of(*w), f64_of(*g));
        if name != gname || !agree(g, w, rtol, 0.0) {
            return Err(format!("output {name}: jit {g:e}, interp {w:e}"));
        }
        if w.is_finite() && w != 0.0 {
            worst = worst.max((g - w).abs() / w.abs());
        }
    }
    if want.values.len() != got.values.len() {
        return Err("different node counts".into());
    }
    for (i, (w, g)) in want.values.iter().zip(&got.values).enumerate() {
        match (w, g) {
            (Tensor::F(w), Tensor::F(g)) => {
                if w.shape() != g.shape() {
                    return Err(format!("%{i}: shape {:?} vs {:?}", g.shape(), w.shape()));
                }
                let scale = w.iter().fold(0.0f64, |m, x| {
                    let x = f64_of(*x);
                    if x.is_finite() {
                        m.max(x.abs())
                    } else {
                        m
                    }
                });
                for (k, (a, b)) in g.iter().zip(w.iter()).enumerate() {
                    let (a, b) = (f64_of(*a), f64_of(*b));
                    if !agree(a, b, rtol, scale) {
                        return Err(format!(
                            "%{i} element {k}: jit {a:e}, interp {b:e}\n  {}",
                            lossc::ir::print::print_node(
                                graph,
                                lossc::ir::NodeId(i as u32),
                                &graph.nodes[i]
                            )
                        ));
                    }
                    if b.is_finite() && b.abs() > 1e-6 * scale && b != 0.0 {
                        worst = worst.max((a - b).abs() / b.abs());
                    }
                }
            }
            (Tensor::I(w), Tensor::I(g)) if w == g => {}
            (Tensor::B(w), Tensor::B(g)) if w == g => {}
            _ => return Err(format!("%{i}: int/bool values or kinds differ")),
        }
    }
    // The gradient tensors as users see them (split by column).
    let gw = lossc::gradient_tensors(graph, bound, want);
    let gg = lossc::gradient_tensors(graph, bound, got);
    if gw.len() != gg.len()
        || gw
            .iter()
            .zip(&gg)
            .any(|(a, b)| a.0 != b.0 || a.1.shape != b.1.shape)
    {
        return Err("gradient tensors differ in names or shapes".into());
    }
    for ((name, w), (_, g)) in gw.iter().zip(&gg) {
        let (w, g) = (w.to_f64_vec(), g.to_f64_vec());
        let scale = w
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        if let Some(k) = (0..w.len()).find(|&k| !agree(g[k], w[k], rtol, scale)) {
            return Err(format!(
                "grad.{name}[{k}]: jit {:e}, interp {:e}",
                g[k], w[k]
            ));
        }
    }
    Ok(worst)
}

/// Compares a JIT evaluation with the interpreter's when the JIT reduced some
/// nodes in another order (`JitProgram::reordered_nodes`: contractions run as
/// GEMM, blocked and with fused multiply-add; sums, logsumexps and extremes
/// in SIMD lanes). The interpreter runs once on a graph where every reordered
/// node reads the JIT's value (so an order difference upstream is not
/// amplified downstream — a sign near 0, a different max — into failures
/// that say nothing about the code under test), with two appended copies of
/// each reordered node: its own comprehension, computed from those values,
/// and the same over `|term|`. A reordered element must agree with its copy
/// to `rtol` of the larger of its node's largest element and its `sum
/// |term|` (under cancellation rounding is relative to the terms, not the
/// value); every other node is compared at `rtol`.
fn compare_contracted<F: Real>(
    program: &JitProgram,
    graph: &Graph,
    bound: &Bound,
    want: Evaluation<F>,
    got: Evaluation<F>,
    rtol: f64,
) -> Result<(Evaluation<F>, f64), String> {
    let reordered = program.reordered_nodes();
    if reordered.is_empty() {
        return compare(graph, bound, &want, &got, rtol).map(|worst| (got, worst));
    }
    let n = graph.nodes.len();
    let mut fed = graph.clone();
    let mut fed_bound = bound.clone();
    // (node, its copy, its copy over |term|)
    let mut copies = Vec::new();
    for id in &reordered {
        let node = graph.nodes[id.index()].clone();
        let lossc::ir::NodeKind::Comp(c) = &node.kind else {
            return Err(format!(
                "%{}: a reordered node that is not a comprehension",
                id.index()
            ));
        };
        let mut magnitude = node.clone();
        let mut abs = c.clone();
        abs.body = lossc::ir::Expr::Unary(lossc::ir::UnOp::Abs, Box::new(c.body.clone()));
        magnitude.kind = lossc::ir::NodeKind::Comp(abs);
        fed.nodes.push(node);
        fed.nodes.push(magnitude);
        copies.push((id.index(), fed.nodes.len() - 2, fed.nodes.len() - 1));
    }
    for id in &reordered {
        let i = id.index();
        let Some(Tensor::F(g)) = got.values.get(i) else {
            return Err(format!("%{i}: a reordered node without a float value"));
        };
        let name = format!("__jit_reordered_{i}");
        fed.nodes[i].kind = lossc::ir::NodeKind::Input {
            name: name.clone(),
            variadic: false,
        };
        fed_bound.inputs.push(bind::BoundInput {
            node: *id,
            name: name.clone(),
            columns: vec![name],
            tensor: lossc::tensor_io::HostTensor {
                shape: g.shape().to_vec(),
                data: lossc::tensor_io::TensorData::F64(g.iter().map(|x| f64_of(*x)).collect()),
            },
            split_columns: false,
        });
    }
    let mut want_fed = interp::evaluate::<F>(&fed, &fed_bound).map_err(|e| {
        format!(
            "interp on the JIT's reordered values: {} {}",
            e.code, e.message
        )
    })?;
    for (i, copy, magnitude) in copies {
        let (Some(Tensor::F(w)), Some(Tensor::F(m)), Some(Tensor::F(g))) = (
            want_fed.values.get(copy),
            want_fed.values.get(magnitude),
            got.values.get(i),
        ) else {
            return Err(format!("%{i}: a reordered node without a float value"));
        };
        if w.shape() != g.shape() {
            return Err(format!("%{i}: shape {:?} vs {:?}", g.shape(), w.shape()));
        }
        let scale = w
            .iter()
            .map(|x| f64_of(*x))
            .filter(|x| x.is_finite())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        for (k, ((a, b), t)) in g.iter().zip(w.iter()).zip(m.iter()).enumerate() {
            let (a, b, t) = (f64_of(*a), f64_of(*b), f64_of(*t).abs());
            // `agree`'s floor is a millionth of its scale: this makes it
            // `rtol` times the larger of the largest element and `sum |term|`.
            let floor = if t.is_finite() { scale.max(t) } else { scale };
            if !agree(a, b, rtol, floor * 1e6) {
                return Err(format!(
                    "reordered %{i} element {k}: jit {a:e}, interp {b:e}\n  {}",
                    lossc::ir::print::print_node(
                        graph,
                        lossc::ir::NodeId(i as u32),
                        &graph.nodes[i]
                    )
                ));
            }
        }
    }
    want_fed.values.truncate(n);
    let worst = compare(graph, bound, &want_fed, &got, rtol)?;
    Ok((got, worst))
}

/// A program's loss `name` (the only one: `None`) with its gradient, and
/// its JIT code in f64.
fn jit_of(src: &str, name: Option<&str>) -> (Graph, JitProgram) {
    let graph = compile_src(src, name, &lossc::Params::new()).unwrap_or_else(|e| panic!("{e}"));
    let full = lossc::differentiate(&graph).0;
    let code = jit::compile(&full, Precision::F64).unwrap();
    (full, code)
}

/// The ids of `graph`'s nodes that `keep` accepts, in order.
fn nodes_where(graph: &Graph, keep: impl Fn(&lossc::ir::NodeId) -> bool) -> Vec<lossc::ir::NodeId> {
    (0..graph.nodes.len())
        .map(|i| lossc::ir::NodeId(i as u32))
        .filter(|id| keep(id))
        .collect()
}

/// `both_with` in f64 and f32, every node kept, on one thread and on three.
fn both_on_one_and_three_threads(graph: &Graph, bound: &Bound, code: &JitProgram, case: &str) {
    for threads in [1, 3] {
        let opts = jit::RunOptions {
            threads,
            ..jit::RunOptions::full()
        };
        both_with::<f64>(graph, bound, code, RTOL_F64, opts)
            .unwrap_or_else(|e| panic!("{case} threads={threads}: {e}"));
        both_with::<f32>(graph, bound, code, RTOL_F32, opts)
            .unwrap_or_else(|e| panic!("{case} threads={threads} f32: {e}"));
    }
}

/// Runs both backends in precision `F` and compares them.
fn both<F: Real>(
    graph: &Graph,
    bound: &Bound,
    program: &JitProgram,
    rtol: f64,
) -> Result<(Evaluation<F>, f64), String> {
    both_with(graph, bound, program, rtol, jit::RunOptions::full())
}

/// `both` with the JIT run under `opts` (which must keep every node's value).
fn both_with<F: Real>(
    graph: &Graph,
    bound: &Bound,
    program: &JitProgram,
    rtol: f64,
    opts: jit::RunOptions,
) -> Result<(Evaluation<F>, f64), String> {
    let t0 = Instant::now();
    let want = interp::evaluate::<F>(graph, bound);
    let t1 = Instant::now();
    let got = program.run_with::<F>(bound, opts);
    let t2 = Instant::now();
    TIMES.with(|t| {
        let mut t = t.borrow_mut();
        t.0 += (t1 - t0).as_secs_f64();
        t.1 += (t2 - t1).as_secs_f64();
    });
    match (want, got) {
        (Ok(w), Ok(g)) => compare_contracted(program, graph, bound, w, g, rtol),
        (Err(w), Err(g)) if w.code == g.code && w.message == g.message => {
            Err(format!("SAME-ERROR {}: {}", w.code, w.message))
        }
        (Err(w), Err(g)) => Err(format!(
            "different errors: interp {} {}, jit {} {}",
            w.code, w.message, g.code, g.message
        )),
        (Ok(_), Err(g)) => Err(format!(
            "jit failed where interp ran: {} {}",
            g.code, g.message
        )),
        (Err(w), Ok(_)) => Err(format!(
            "jit ran where interp failed: {} {}",
            w.code, w.message
        )),
    }
}

fn bind_or(graph: &Graph, tensors: &TensorMap) -> Result<Bound, String> {
    bind::bind(graph, tensors).map_err(|d| {
        d.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    })
}

fn defined(program: &lossc::elab::Program, class: &str) -> bool {
    lossc::select_loss(program, None, Some(class)).is_ok()
}

#[test]
fn every_fixture_case_agrees_with_the_interpreter_and_the_reference() {
    let program = lossc::elab::Program::new();
    let mut failures = Vec::new();
    let (mut ran, mut skipped) = (0, 0);
    let mut skipped_classes = std::collections::BTreeSet::new();
    let mut compile_ms: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let (mut worst64, mut worst32) = (0.0f64, 0.0f64);
    let mut jit_compile_s = 0.0;
    let mut library_errors = Vec::new();
    for case in manifest() {
        if !defined(&program, &case.class) {
            skipped += 1;
            skipped_classes.insert(case.class.clone());
            continue;
        }
        ran += 1;
        let tensors = read_case(&case);
        let graph = match compile_std_for(&case.class, &case.params, &tensors) {
            Ok(g) => g,
            Err(e) => {
                // The library's own problem (fixtures_loss.rs reports it):
                // counted and shown, not a JIT failure.
                let first = e.lines().next().unwrap_or("").to_string();
                library_errors.push(format!("{}: {first}", case.id));
                ran -= 1;
                continue;
            }
        };
        let full = lossc::differentiate(&graph).0;
        let bound = match bind_or(&full, &tensors) {
            Ok(b) => b,
            Err(e) => {
                failures.push(format!("{}: bind: {e}", case.id));
                continue;
            }
        };
        let t = Instant::now();
        let jit64 = match jit::compile(&full, Precision::F64) {
            Ok(p) => p,
            Err(e) => {
                failures.push(format!("{}: jit compile failed: {e}", case.id));
                continue;
            }
        };
        let jit32 = jit::compile(&full, Precision::F32).expect("f32 compiles when f64 does");
        jit_compile_s += t.elapsed().as_secs_f64();
        compile_ms
            .entry(case.class.clone())
            .or_insert((jit64.compile_ms(), full.nodes.len()));
        match both::<f64>(&full, &bound, &jit64, RTOL_F64) {
            Ok((eval, worst)) => {
                worst64 = worst64.max(worst);
                let loss = eval.outputs[0].1;
                if !close(loss, case.loss, 1e-9) {
                    failures.push(format!(
                        "{} f64: jit loss {loss} vs reference {}",
                        case.id, case.loss
                    ));
                }
            }
            Err(e) => failures.push(format!("{} f64: {e}", case.id)),
        }
        match both::<f32>(&full, &bound, &jit32, RTOL_F32) {
            Ok((eval, worst)) => {
                worst32 = worst32.max(worst);
                let loss = eval.outputs[0].1 as f64;
                if !close(loss, case.loss, 1e-4) {
                    failures.push(format!(
                        "{} f32: jit loss {loss} vs reference {}",
                        case.id, case.loss
                    ));
                }
            }
            Err(e) => failures.push(format!("{} f32: {e}", case.id)),
        }
    }
    eprintln!(
        "jit: {ran} fixture cases ran, {skipped} skipped (classes not in the library yet: {:?})",
        skipped_classes
    );
    eprintln!(
        "jit: worst relative difference from the interpreter: f64 {worst64:.1e}, f32 {worst32:.1e}"
    );
    eprintln!("jit: time {}, jit compile {jit_compile_s:.2} s", times());
    for (class, (ms, nodes)) in &compile_ms {
        eprintln!("jit compile {class:<48} {nodes:>4} nodes {ms:>8.1} ms");
    }
    if !library_errors.is_empty() {
        eprintln!(
            "jit: {} cases skipped because the library does not compile them:\n  {}",
            library_errors.len(),
            library_errors.join("\n  ")
        );
    }
    assert!(ran > 0, "no fixture case ran");
    assert!(
        failures.is_empty(),
        "{} failures in {ran} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn random_inputs_at_odd_sizes_agree_for_every_library_loss() {
    let classes = library_classes();
    let mut failures = Vec::new();
    let (mut runs, mut same_errors, mut not_compiled) = (0, 0, Vec::new());
    let mut error_kinds = std::collections::BTreeSet::new();
    let mut compile_s = 0.0;
    let mut reused = 0;
    for class in &classes {
        let mut params = first_case_params(class);
        // Truncation dims that fit D = 5.
        if params.contains_key("matryoshka_dims") {
            params.insert("matryoshka_dims".into(), serde_json::json!([5, 4, 2]));
        }
        let base = match compile_std(class, &params) {
            Ok(g) => g,
            Err(_) => {
                not_compiled.push(class.clone());
                continue;
            }
        };
        let columns = base.inputs().any(|(_, _, _, variadic)| variadic);
        let ks: &[i64] = if columns { &[0, 1, 3] } else { &[1] };
        for &k in ks {
            let mut current: Option<(Graph, JitProgram)> = None;
            for (n, &b) in [1i64, 3, 17].iter().enumerate() {
                let dims = BTreeMap::from([
                    ("B".to_string(), b),
                    ("D".to_string(), 5),
                    ("K".to_string(), k),
                ]);
                let dims: BTreeMap<String, i64> = dims
                    .into_iter()
                    .filter(|(d, _)| base.dim_names().contains(d))
                    .collect();
                let tensors = match bind::random_inputs(&base, 7 + n as u64, &dims) {
                    Ok(t) => t,
                    Err(e) => {
                        failures.push(format!("{class} B={b} K={k}: random inputs: {e}"));
                        continue;
                    }
                };
                // One graph and one JitProgram per (loss, K), reused at every
                // B when the graph binds (the code is size-generic).
                let reusable = current
                    .as_ref()
                    .and_then(|(full, _): &(Graph, JitProgram)| bind::bind(full, &tensors).ok());
                if reusable.is_some() {
                    reused += 1;
                } else {
                    let graph = match compile_std_for(class, &params, &tensors) {
                        Ok(g) => g,
                        Err(_) => {
                            // A size this loss's parameters do not allow: not a JIT matter.
                            not_compiled.push(format!("{class} B={b} K={k}"));
                            continue;
                        }
                    };
                    let full = lossc::differentiate(&graph).0;
                    let t = Instant::now();
                    let code = match jit::compile(&full, Precision::F64) {
                        Ok(c) => c,
                        Err(e) => {
                            failures.push(format!("{class} B={b} K={k}: jit compile: {e}"));
                            continue;
                        }
                    };
                    compile_s += t.elapsed().as_secs_f64();
                    current = Some((full, code));
                }
                let (full, code) = current.as_ref().expect("compiled above");
                let bound = match reusable.map_or_else(|| bind_or(full, &tensors), Ok) {
                    Ok(x) => x,
                    Err(e) => {
                        failures.push(format!("{class} B={b} K={k}: bind: {e}"));
                        continue;
                    }
                };
                runs += 1;
                for result in [
                    both::<f64>(full, &bound, code, RTOL_F64).map(|_| ()),
                    both::<f32>(full, &bound, code, RTOL_F32).map(|_| ()),
                ] {
                    match result {
                        Ok(()) => {}
                        Err(e) if e.starts_with("SAME-ERROR") => {
                            same_errors += 1;
                            error_kinds
                                .insert(format!("{class}: {}", e.lines().next().unwrap_or("")));
                        }
                        Err(e) => failures.push(format!("{class} B={b} K={k}: {e}")),
                    }
                }
            }
        }
    }
    eprintln!(
        "jit: {runs} random runs over {} library losses ({same_errors} precision-runs ended in the same runtime error on both backends); not compiled at these sizes: {not_compiled:?}",
        classes.len()
    );
    for e in &error_kinds {
        eprintln!("  same error on both: {e}");
    }
    eprintln!("jit: {reused} runs reused the graph and code compiled at another B");
    eprintln!("jit: time {}, jit compile {compile_s:.2} s", times());
    assert!(runs > 0);
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn one_program_runs_at_every_size() {
    let graph = compile_std("MultipleNegativesRankingLoss", &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let code = jit::compile(&full, Precision::F64).unwrap();
    for (seed, b) in [(1u64, 1i64), (2, 3), (3, 17), (4, 2)] {
        let dims = BTreeMap::from([
            ("B".to_string(), b),
            ("D".to_string(), 5),
            ("K".to_string(), 2),
        ]);
        let tensors = bind::random_inputs(&full, seed, &dims).unwrap();
        let bound = bind_or(&full, &tensors).unwrap();
        both::<f64>(&full, &bound, &code, RTOL_F64).unwrap_or_else(|e| panic!("B={b}: {e}"));
        // The other precision is compiled on first use and kept.
        both::<f32>(&full, &bound, &code, RTOL_F32).unwrap_or_else(|e| panic!("B={b} f32: {e}"));
    }
}

const GATHER: &str = r#"
loss Gather() {
    input logits: [B, C]
    input labels: int[B]
    let picked[i] = logits[i, labels[i]]
    mean(i) (logsumexp(c) logits[i, c] - picked[i])
}
loss Guarded() {
    input logits: [B, C]
    input labels: int[B]
    mean(i) (if labels[i] >= 0 and labels[i] < size(logits, 1) then logits[i, labels[i]] else 0.0)
}
"#;

fn gather_tensors(labels: &str) -> TensorMap {
    tensors_of(&format!(
        r#"{{"logits": [[2.0, 0.5, -1.0], [0.0, 1.0, 3.0], [1.0, 1.0, 0.0]], "labels": {labels}}}"#
    ))
}

#[test]
fn out_of_range_label_is_lc0506_not_a_crash() {
    let graph = compile_src(GATHER, Some("Gather"), &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let code64 = jit::compile(&full, Precision::F64).unwrap();
    let code32 = jit::compile(&full, Precision::F32).unwrap();
    for labels in ["[0, 3, 1]", "[0, 2, -1]", "[100000000000, 0, 0]"] {
        let tensors = gather_tensors(labels);
        let bound = bind_or(&full, &tensors).unwrap();
        let want = interp::evaluate::<f64>(&full, &bound)
            .err()
            .expect("interp rejects");
        for got in [
            code64.run::<f64>(&bound).err().expect("jit f64 rejects"),
            code32.run::<f32>(&bound).err().expect("jit f32 rejects"),
        ] {
            assert_eq!(got.code, "LC0506", "{labels}: {}", got.message);
            assert_eq!(got.message, want.message, "{labels}");
        }
    }
    // In range: the same values.
    let tensors = gather_tensors("[0, 2, 1]");
    let bound = bind_or(&full, &tensors).unwrap();
    both::<f64>(&full, &bound, &code64, RTOL_F64).unwrap();
}

#[test]
fn a_read_guarded_by_if_runs_only_when_taken() {
    let (full, code) = jit_of(GATHER, Some("Guarded"));
    let tensors = gather_tensors("[0, 7, -2]");
    let bound = bind_or(&full, &tensors).unwrap();
    let (eval, _) = both::<f64>(&full, &bound, &code, RTOL_F64).unwrap();
    assert!((eval.outputs[0].1 - 2.0 / 3.0).abs() < 1e-15);
}

/// `truncate(x, 3)` reads columns `0 .. 3` of a dim `D`: the JIT assumes
/// `D >= 3` and reads them unchecked (and in vector lanes) when that holds.
/// Where it does not, the node goes to the interpreter: its values where the
/// guard keeps the reads from running, its error where one runs.
const TRUNCATED: &str = r#"
loss Truncated() {
    input x: [B, D]
    input flag: [B]
    let y = truncate(x, 3)
    sum(b, t) (if flag[b] > 0.0 then y[b, t] else 0.5)
}
"#;

#[test]
fn an_assumed_bound_that_fails_hands_the_node_to_the_interpreter() {
    let (full, code) = jit_of(TRUNCATED, None);
    let run = |x: &str, flag: &str| {
        let tensors = tensors_of(&format!(r#"{{"x": {x}, "flag": {flag}}}"#));
        let bound = bind_or(&full, &tensors).unwrap();
        both::<f32>(&full, &bound, &code, RTOL_F32).map(|_| ())?;
        both::<f64>(&full, &bound, &code, RTOL_F64).map(|(e, _)| e.outputs[0].1)
    };
    // D = 4: the assumption holds, the kernel runs.
    let wide = "[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]";
    assert_eq!(run(wide, "[1.0, -1.0]"), Ok(6.0 + 1.5));
    // D = 2, no read taken: the interpreter's values.
    let narrow = "[[1.0, 2.0], [3.0, 4.0]]";
    assert_eq!(run(narrow, "[0.0, -1.0]"), Ok(3.0));
    // D = 2, a read taken: the interpreter's error, word for word.
    let err = run(narrow, "[0.0, 1.0]").unwrap_err();
    assert!(
        err.starts_with("SAME-ERROR LC0506: index 2 is out of range for dim 1"),
        "{err}"
    );
}

/// `# key: value` directives of a program file, objects merged.
fn directive(text: &str, key: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    let mut out: Option<serde_json::Map<String, serde_json::Value>> = None;
    for line in text.lines() {
        let Some(rest) = line.trim().strip_prefix('#') else {
            continue;
        };
        let Some(value) = rest.trim().strip_prefix(&format!("{key}:")) else {
            continue;
        };
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(value.trim()) {
            out.get_or_insert_with(Default::default).extend(m);
        }
    }
    out
}

#[test]
fn the_program_suite_agrees_including_runtime_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs");
    let mut files = Vec::new();
    for sub in ["ok", "errors"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            files.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
        }
    }
    files.sort();
    let (mut ran, mut errors) = (0, 0);
    let mut failures = Vec::new();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "loss"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        let Some(inputs) = directive(&text, "inputs") else {
            continue;
        };
        let params = directive(&text, "params").unwrap_or_default();
        let name = text.lines().find_map(|l| {
            l.trim()
                .strip_prefix("# loss:")
                .map(|s| s.trim().to_string())
        });
        let Ok(graph) = compile_src(&text, name.as_deref(), &params) else {
            continue;
        };
        let Ok(tensors) =
            lossc::tensor_io::read_json_str(&serde_json::Value::Object(inputs).to_string(), "test")
        else {
            continue;
        };
        let full = lossc::differentiate(&graph).0;
        let Ok(bound) = bind_or(&full, &tensors) else {
            continue;
        };
        let code = match jit::compile(&full, Precision::F64) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{}: jit compile: {e}", path.display()));
                continue;
            }
        };
        ran += 1;
        for result in [
            both::<f64>(&full, &bound, &code, RTOL_F64).map(|_| ()),
            both::<f32>(&full, &bound, &code, RTOL_F32).map(|_| ()),
        ] {
            match result {
                Ok(()) => {}
                Err(e) if e.starts_with("SAME-ERROR") => errors += 1,
                Err(e) => failures.push(format!("{}: {e}", path.display())),
            }
        }
    }
    eprintln!("jit: {ran} suite programs ran on both backends ({errors} precision-runs ended in the same runtime error)");
    assert!(ran > 0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cli_run_with_the_jit_backend_matches_the_interpreter() {
    let run = |backend: &str, dtype: &str| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lossc"))
            .args([
                "run",
                "--loss",
                "MultipleNegativesRankingLoss",
                "--dims",
                "B=5,D=7,K=2",
            ])
            .args(["--backend", backend, "--dtype", dtype, "--format", "json"])
            .output()
            .expect("runs lossc");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    };
    // The JIT runs the contractions as GEMM, in another summation order, so
    // the figures agree to rounding (the agreement tests' tolerances), not
    // bit for bit.
    let close = |a: &serde_json::Value, b: &serde_json::Value, rtol: f64| -> bool {
        match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= rtol * x.abs().max(y.abs()).max(1e-300),
            _ => false,
        }
    };
    for (dtype, rtol) in [("f64", RTOL_F64), ("f32", RTOL_F32)] {
        let (jit, interp) = (run("jit", dtype), run("interp", dtype));
        assert_eq!(jit["backend"], "jit");
        assert_eq!(interp["backend"], "interp");
        assert!(
            close(&jit["loss"], &interp["loss"], rtol),
            "{dtype}: loss {} vs {}",
            jit["loss"],
            interp["loss"]
        );
        let (Some(jg), Some(ig)) = (jit["grads"].as_object(), interp["grads"].as_object()) else {
            panic!(
                "{dtype}: grads are not objects: {} vs {}",
                jit["grads"], interp["grads"]
            );
        };
        assert_eq!(
            jg.keys().collect::<Vec<_>>(),
            ig.keys().collect::<Vec<_>>(),
            "{dtype}"
        );
        for (name, g) in jg {
            let w = &ig[name];
            assert_eq!(g["shape"], w["shape"], "{dtype} grad {name}");
            assert!(
                close(&g["l2"], &w["l2"], rtol),
                "{dtype} grad {name}: l2 {} vs {}",
                g["l2"],
                w["l2"]
            );
        }
    }
}

const EDGES: &str = r#"
loss Edges() {
    input x: [N]
    input n: int[N]
    input m: int[N]
    let l[i] = log(x[i])
    output nan_max = max(i) l[i]
    output nan_min = min(i) l[i]
    output tie_max = sum(j) max(i) float(n[i] > n[j])
    output lse_empty = logsumexp(i | x[i] > 1000) x[i]
    output lse_all_neg_inf = logsumexp(i) log(x[i] * 0)
    output lse_big = logsumexp(i) 1000 * x[i]
    output lse_nan = logsumexp(i) l[i]
    output maxi = sum(i) maximum(l[i], 0.0)
    output mini = sum(i) minimum(l[i], 0.0)
    output clampy = sum(i) clamp(l[i], -1, 1)
    output max_zero = min(i) 1 / maximum(-relu(-x[i]), 0.0)
    output rem = sum(i) float(n[i] % m[i])
    output fdiv = sum(i) float(n[i] // m[i])
    output smooth = sum(i) (softplus(100 * x[i]) + log_sigmoid(-100 * x[i]) + sigmoid(-800 * x[i]) + tanh(50 * x[i]))
    output relu_nan = sum(i) relu(l[i])
    output powy = sum(i) abs(x[i]) ^ x[i]
    output mean_empty = mean(i | x[i] > 1000, else 7) x[i]
    output arg_first = sum(j) float(max(i) float(x[i] == x[j]))
    sum(i) x[i] * x[i]
}
"#;

#[test]
fn edge_semantics_agree_nan_ties_empty_sets_and_int_division() {
    let (full, code) = jit_of(EDGES, None);
    let tensors = tensors_of(
        r#"{"x": [-2.0, 0.0, 0.5, 1.5, 3.0, 0.5], "n": [7, -7, 4, 0, -9, 9], "m": [3, 3, -3, 5, -4, -1]}"#,
    );
    let bound = bind_or(&full, &tensors).unwrap();
    let (eval, _) = both::<f64>(&full, &bound, &code, RTOL_F64).unwrap();
    both::<f32>(&full, &bound, &code, RTOL_F32).unwrap();
    let out = |name: &str| eval.outputs.iter().find(|o| o.0 == name).unwrap().1;
    assert!(out("nan_max").is_nan() && out("nan_min").is_nan() && out("maxi").is_nan());
    assert_eq!(out("lse_empty"), f64::NEG_INFINITY);
    assert_eq!(out("lse_all_neg_inf"), f64::NEG_INFINITY);
    assert_eq!(out("mean_empty"), 7.0);
    // maximum(-0.0, 0.0) keeps its first operand, -0.0, as the interpreter.
    assert_eq!(out("max_zero"), f64::NEG_INFINITY);
    // 7%3=1, -7%3=2, 4%-3=1, 0%5=0, -9%-4=3, 9%-1=0; 7//3=2, -7//3=-3,
    // 4//-3=-1, 0//5=0, -9//-4=3, 9//-1=-9.
    assert_eq!(out("rem"), 7.0);
    assert_eq!(out("fdiv"), -8.0);
    // A zero divisor is the interpreter's error on both backends.
    let tensors = tensors_of(
        r#"{"x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "n": [1, 2, 3, 4, 5, 6], "m": [1, 1, 0, 1, 1, 1]}"#,
    );
    let bound = bind_or(&full, &tensors).unwrap();
    let err = both::<f64>(&full, &bound, &code, RTOL_F64).err().unwrap();
    assert!(err.starts_with("SAME-ERROR LC0506"), "{err}");
}

const CONTRACTIONS: &str = r#"
loss Contractions() {
    input x: [B, N, D]
    input y: [B, D, M]
    input p: [N, D]
    input q: [D, M]
    let bmm[b, i, j] = sum(k) x[b, i, k] * y[b, k, j]
    let tr[i, j] = sum(k) q[k, j] * p[i, k]
    let tt[j, i] = sum(k) q[k, j] * p[i, k]
    sum(b, i, j) bmm[b, i, j] * tr[i, j] + sum(j, i) tt[j, i] * tt[j, i]
}
"#;

#[test]
fn contractions_run_as_gemm_batched_transposed_and_empty() {
    let graph =
        compile_src(CONTRACTIONS, None, &lossc::Params::new()).unwrap_or_else(|e| panic!("{e}"));
    let full = lossc::differentiate(&graph).0;
    // The forward batched, plain, swapped-operand and transposed-output
    // products, and the gradient's transposed contractions.
    let gemm = jit::contraction_nodes(&full);
    for i in [4u32, 5, 6, 14, 15, 16, 17, 18, 19] {
        assert!(
            gemm.contains(&lossc::ir::NodeId(i)),
            "%{i} is not recognised: {gemm:?}"
        );
    }
    let code = jit::compile(&full, Precision::F64).unwrap();
    // D = 0 is an empty sum; N = 1 and M = 1 are degenerate matrices.
    for (seed, (b, n, d, m)) in [
        (1u64, (3i64, 4i64, 5i64, 2i64)),
        (2, (2, 1, 7, 1)),
        (3, (2, 3, 0, 4)),
    ] {
        let dims = BTreeMap::from([
            ("B".to_string(), b),
            ("N".to_string(), n),
            ("D".to_string(), d),
            ("M".to_string(), m),
        ]);
        let tensors = bind::random_inputs(&full, seed, &dims).unwrap();
        let bound = bind_or(&full, &tensors).unwrap();
        both::<f64>(&full, &bound, &code, RTOL_F64).unwrap_or_else(|e| panic!("{dims:?}: {e}"));
        both::<f32>(&full, &bound, &code, RTOL_F32).unwrap_or_else(|e| panic!("{dims:?} f32: {e}"));
    }
}

const LANES: &str = r#"
loss Lanes() {
    input x: [B, N]
    input s: [B, N]
    input t: [B, N]
    input u: [B, N]
    input lab: int[B, N]
    let q[i, j] = if lab[i, j] == lab[i, 0] and j != i then s[i, j] * 3.0 else s[i, j]
    let w[i, j] = if lab[i, j] != i then t[i, j] * t[i, j] else 0.0
    let d[i, j] = if i == j then maximum(x[i, j], 0.5) else relu(x[i, j]) * 2.0
    let c[i, j] = if x[i, j] > 0.0 then sqrt(x[i, j]) else -x[i, j]
    let g[i, j] = if j >= i then exp(-abs(x[i, j])) else minimum(x[i, j], 1.0)
    let col[j] = sum(i) x[i, j] * s[i, j]
    let colmean[j] = mean(i | i != 1) exp(x[i, j] * 0.01) * t[i, j]
    output columns = sum(j) (col[j] + colmean[j])
    sum(i, j) (q[i, j] + w[i, j] + d[i, j] + c[i, j] + g[i, j] + s[i, j] * exp(x[i, j]) + t[i, j] * exp(log(x[i, j])) + u[i, j] * exp(1e300 * x[i, j]))
}
"#;

/// SIMD lanes compute what the scalar code computes, bit for bit: exp
/// (lossc's own, `lossc::math`, also the interpreter's; the gradients with
/// respect to `s`, `t`, `u` hold `exp` of `x`, of `log x` and of `1e300 x`,
/// and the label masks; the gradient with respect to `x` is mostly NaN or
/// infinite by design) across and past the ends of its range, on NaN, infinities,
/// zeros and subnormals; diagonal masks (`i == j`, `j >= i`), per-lane `if`,
/// relu, maximum/minimum; int labels compared per lane (`lab[i, j] ==
/// lab[i, 0]`, `lab[i, j] != i`); column sums and means (`sum(i) x[i, j]`, lanes
/// along `j`); and the scalar remainder of every row length from 1 to 11.
#[test]
fn simd_lanes_agree_bit_for_bit_with_the_interpreter() {
    let (full, code) = jit_of(LANES, None);
    assert!(
        code.vectorised_kernels() >= 5,
        "only {} kernels run in SIMD lanes",
        code.vectorised_kernels()
    );
    let special = [
        0.0, -0.0, 709.7, 710.5, -744.0, -745.5, -1e4, 88.7, -103.5, 1e-310, 0.5, -2.25, 1.0, 3.7,
        -0.37, 1e-20, 87.9,
    ];
    let reordered = code.reordered_nodes();
    let mut compared = 0usize;
    for n in 1..=11usize {
        let b = 3usize;
        let x: Vec<f64> = (0..b * n)
            .map(|k| special[(k * 5 + n * 3) % special.len()])
            .collect();
        let ones = |v: f64| lossc::tensor_io::HostTensor::f64(vec![b, n], vec![v; b * n]);
        let tensors = TensorMap::from([
            (
                "x".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![b, n], x),
            ),
            ("s".to_string(), ones(1.0)),
            ("t".to_string(), ones(0.5)),
            ("u".to_string(), ones(0.25)),
            (
                "lab".to_string(),
                lossc::tensor_io::HostTensor::i64(
                    vec![b, n],
                    (0..b * n).map(|k| ((k * 7 + n) % 3) as i64).collect(),
                ),
            ),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        for f32_run in [false, true] {
            let pairs = if f32_run {
                let want = interp::evaluate::<f32>(&full, &bound).unwrap();
                float_nodes(&want, &code.run::<f32>(&bound).unwrap())
            } else {
                let want = interp::evaluate::<f64>(&full, &bound).unwrap();
                float_nodes(&want, &code.run::<f64>(&bound).unwrap())
            };
            for (w, g, i) in pairs {
                if reordered.contains(&lossc::ir::NodeId(i as u32)) {
                    continue;
                }
                for (k, (a, b)) in g.iter().zip(&w).enumerate() {
                    assert!(
                        (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
                        "N={n} f32={f32_run} %{i}[{k}]: jit {a:e}, interp {b:e}"
                    );
                    compared += 1;
                }
            }
        }
    }
    assert!(compared > 1000, "{compared} elements compared");
}

const GUARDED_LANES: &str = r#"
loss Guarded() {
    input x: [B, N]
    let z = truncate(x, 3)
    sum(i, j) exp(x[i, j]) * 0.5 + sum(i, j) z[i, j] * z[i, j]
}
loss Rows() {
    input x: [B, N]
    input lab: int[B]
    sum(i) (sum(j) x[lab[i], j] * x[i, j])
}
loss Mixed() {
    input x: [B, N]
    input lab: int[B]
    sum(i, j) (if j < 3 then x[lab[i], j] else 0.0) * x[i, j]
}
"#;

/// A vector step that may not run every lane hands the rest of its row to
/// the scalar loop. The gradient of `truncate` reads `if j < 3 then dz[i,
/// j]` (`dz` has 3 columns; one `if`, so `opt::piecewise` leaves it): lanes
/// where `j < 3` and `j >= 3` meet in one step for both precisions, so the
/// steps before run in lanes and the rest of the row runs scalar, bit for
/// bit as the interpreter. A read whose leading index is out of range (`x[lab[i],
/// j]`) leaves the vector loop too, and the scalar code raises the
/// interpreter's error.
#[test]
fn a_vector_step_that_cannot_run_every_lane_hands_the_row_to_the_scalar_loop() {
    let graph = compile_src(GUARDED_LANES, Some("Guarded"), &lossc::Params::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let full = lossc::differentiate(&graph).0;
    let code = jit::compile(&full, Precision::F64).unwrap();
    let grad = full.grads[0].1;
    assert!(code.is_vectorised(grad), "the gradient runs in lanes");
    let mut compared = 0usize;
    for n in 5..=13usize {
        let b = 3usize;
        let x: Vec<f64> = (0..b * n).map(|k| (k as f64 * 0.37).sin()).collect();
        let tensors = TensorMap::from([(
            "x".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![b, n], x),
        )]);
        let bound = bind_or(&full, &tensors).unwrap();
        let pairs = [
            float_nodes(
                &interp::evaluate::<f64>(&full, &bound).unwrap(),
                &code.run::<f64>(&bound).unwrap(),
            ),
            float_nodes(
                &interp::evaluate::<f32>(&full, &bound).unwrap(),
                &code.run::<f32>(&bound).unwrap(),
            ),
        ];
        for nodes in pairs {
            let (w, g, _) = nodes
                .iter()
                .find(|(_, _, i)| *i == grad.index())
                .expect("the gradient is a float node");
            for (k, (a, b)) in g.iter().zip(w).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "N={n} [{k}]: jit {a:e}, interp {b:e}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 400, "{compared} elements compared");

    let (full, code) = jit_of(GUARDED_LANES, Some("Rows"));
    let x: Vec<f64> = (0..4 * 9).map(|k| k as f64 * 0.25).collect();
    for (lab, ok) in [(vec![3, 0, 2, 1], true), (vec![0, 1, 4, 2], false)] {
        let tensors = TensorMap::from([
            (
                "x".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![4, 9], x.clone()),
            ),
            (
                "lab".to_string(),
                lossc::tensor_io::HostTensor::i64(vec![4], lab),
            ),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        for result in [
            both::<f64>(&full, &bound, &code, RTOL_F64).map(|_| ()),
            both::<f32>(&full, &bound, &code, RTOL_F32).map(|_| ()),
        ] {
            match (ok, result) {
                (true, r) => r.unwrap(),
                (false, Err(e)) => assert!(
                    e.starts_with("SAME-ERROR LC0506: index 4 is out of range for dim 0"),
                    "{e}"
                ),
                (false, Ok(())) => panic!("label 4 of 4 rows ran"),
            }
        }
    }

    // `if j < 3` whose taken side can fail for another reason (the label's
    // row): a step where lanes go both ways leaves the vector loop, the
    // untaken lanes are the else side's, whichever order the lanes meet in.
    let (full, code) = jit_of(GUARDED_LANES, Some("Mixed"));
    let vectorised = full.nodes.iter().enumerate().any(|(i, n)| {
        matches!(n.kind, lossc::ir::NodeKind::Comp(_))
            && code.is_vectorised(lossc::ir::NodeId(i as u32))
    });
    assert!(vectorised, "the select runs in lanes");
    for n in [3usize, 4, 5, 7, 9, 11] {
        let x: Vec<f64> = (0..4 * n).map(|k| 1.0 + (k as f64 * 0.61).cos()).collect();
        let tensors = TensorMap::from([
            (
                "x".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![4, n], x),
            ),
            (
                "lab".to_string(),
                lossc::tensor_io::HostTensor::i64(vec![4], vec![2, 0, 3, 1]),
            ),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        both::<f64>(&full, &bound, &code, RTOL_F64).unwrap_or_else(|e| panic!("N={n}: {e}"));
        both::<f32>(&full, &bound, &code, RTOL_F32).unwrap_or_else(|e| panic!("N={n}: {e}"));
    }
}

const SCALARS: &str = r#"
loss Scalars() {
    input x: [B]
    input y: [B]
    input t: [B, B]
    output lse = logsumexp(i, j | x[i] < x[j]) (x[i] - y[j])
    output table = logsumexp(i, j) log(t[i, j])
    output big = logsumexp(i, j) exp(t[i, j])
    output hi = max(i, j) (log(t[i, j]) * x[j])
    output lo = min(i, j | i != j) (x[i] - y[j])
    sum(i, j) (x[i] * y[j] * t[i, j])
}
"#;

/// A reduction to a scalar over a large domain runs on several threads, each
/// a block of its outermost reduced index, the blocks' values combined in
/// order (a logsumexp as the interpreter's two passes over all blocks). At
/// 3 threads over 700 rows the blocks are uneven; the values agree with the
/// interpreter to the rounding of a sum, and NaN, infinities and a block
/// where nothing passes give the interpreter's results exactly.
#[test]
fn reductions_to_a_scalar_split_across_threads_agree() {
    let (full, code) = jit_of(SCALARS, None);
    let opts = jit::RunOptions {
        threads: 3,
        ..jit::RunOptions::full()
    };
    let b = 700usize;
    let base_x: Vec<f64> = (0..b)
        .map(|k| ((k * 37 % 101) as f64 * 0.173).sin() * 3.0)
        .collect();
    let base_y: Vec<f64> = (0..b)
        .map(|k| ((k * 53 % 97) as f64 * 0.311).cos() * 2.0)
        .collect();
    let base_t: Vec<f64> = (0..b * b)
        .map(|k| ((k % 1009) as f64 * 0.0137).sin().abs() * 5.0 + 0.1)
        .collect();
    type Case = (&'static str, fn(&mut [f64], &mut [f64], &mut [f64]));
    let cases: [Case; 5] = [
        ("finite", |_, _, _| {}),
        // The first block's terms of `table` are NaN or -inf (logs of -1
        // and 0): NaN, as the interpreter (its maximum ignores the NaN, its
        // sum does not).
        ("nan in one block", |_, _, t| {
            for (k, v) in t[..100 * 700].iter_mut().enumerate() {
                *v = if k % 2 == 0 { -1.0 } else { 0.0 };
            }
        }),
        // Every term of `table` -inf: -inf.
        ("all -inf", |_, _, t| t.fill(0.0)),
        // A +inf term of `big`: +inf.
        ("+inf", |_, _, t| t[600 * 700 + 3] = 1000.0),
        // Only the last block's rows pass `x[i] < x[j]`: the other blocks
        // are empty.
        ("empty blocks", |x, _, _| {
            for (k, v) in x.iter_mut().enumerate() {
                *v = if k < 690 { 10.0 } else { k as f64 - 1000.0 };
            }
        }),
    ];
    for (name, edit) in cases {
        let (mut x, mut y, mut t) = (base_x.clone(), base_y.clone(), base_t.clone());
        edit(&mut x, &mut y, &mut t);
        let tensors = TensorMap::from([
            (
                "x".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![b], x),
            ),
            (
                "y".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![b], y),
            ),
            (
                "t".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![b, b], t),
            ),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        let (got, _) = both_with::<f64>(&full, &bound, &code, RTOL_F64, opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // In f32 the interpreter's one running sum of 240 000 exponentials
        // is itself off by 2e-5 (the blocks' sums are closer to the f64
        // value): the f32 outputs are held to the f64 interpreter's, within
        // 1e-4 relative.
        let got32 = code.run_with::<f32>(&bound, opts).unwrap();
        for ((o, g), (_, g32)) in got.outputs.iter().zip(&got32.outputs) {
            let g32 = f64::from(*g32);
            assert!(
                g.is_nan() && g32.is_nan()
                    || g.is_infinite() && *g == g32
                    || (g - g32).abs() <= 1e-4 * g.abs(),
                "{name} {o}: jit f32 {g32}, f64 {g}"
            );
        }
        let want = interp::evaluate::<f64>(&full, &bound).unwrap();
        let out =
            |e: &Evaluation<f64>, name: &str| e.outputs.iter().find(|o| o.0 == name).unwrap().1;
        for o in ["lse", "table", "big", "hi", "lo"] {
            let (w, g) = (out(&want, o), out(&got, o));
            let exact = w.is_nan() && g.is_nan() || w.is_infinite() && w == g;
            assert!(
                exact || (w - g).abs() <= 1e-12 * w.abs(),
                "{name} {o}: jit {g}, interp {w}"
            );
        }
    }
}

/// TripletLoss's three gradients are elementwise over `[B, D]`, none reading
/// another, and its two distances are sums over the same `k` for each row:
/// each set runs as one kernel in one pass over the inputs, every element bit
/// for bit as the interpreter, in lanes and in the scalar tail, on one thread
/// and split across three. (The inputs are eighths, so the distances are
/// exact in any summation order.)
#[test]
fn siblings_run_fused_bit_for_bit() {
    let graph = compile_std("TripletLoss", &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let code = jit::compile(&full, Precision::F64).unwrap();
    let grads: Vec<lossc::ir::NodeId> = full.grads.iter().map(|g| g.1).collect();
    let groups = code.fused_groups();
    assert!(
        groups.iter().any(|g| grads.iter().all(|x| g.contains(x))),
        "the gradients {grads:?} are not one group: {groups:?}"
    );
    let distances = nodes_where(&full, |id| {
        matches!(&full.node(*id).kind, lossc::ir::NodeKind::Comp(c) if c.reduce.is_some())
            && full.node(*id).shape.len() == 1
    });
    assert_eq!(distances.len(), 2, "{distances:?}");
    assert!(
        groups.iter().any(|g| *g == distances),
        "the distances {distances:?} are not one group: {groups:?}"
    );
    for (b, d) in [(3usize, 7usize), (70, 1030)] {
        let eighths = |c: usize| {
            let x = (0..b * d)
                .map(|k| ((k * 7 + c) % 17) as f64 / 8.0 - 1.0)
                .collect();
            lossc::tensor_io::HostTensor::f64(vec![b, d], x)
        };
        let tensors = TensorMap::from([
            ("anchor".to_string(), eighths(0)),
            ("positive".to_string(), eighths(5)),
            ("negative".to_string(), eighths(11)),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        for threads in [1, 3] {
            let opts = jit::RunOptions {
                threads,
                ..jit::RunOptions::full()
            };
            let pairs = [
                float_nodes(
                    &interp::evaluate::<f64>(&full, &bound).unwrap(),
                    &code.run_with::<f64>(&bound, opts).unwrap(),
                ),
                float_nodes(
                    &interp::evaluate::<f32>(&full, &bound).unwrap(),
                    &code.run_with::<f32>(&bound, opts).unwrap(),
                ),
            ];
            for nodes in pairs {
                for g in grads.iter().chain(&distances) {
                    let (w, got, _) = nodes.iter().find(|n| n.2 == g.index()).unwrap();
                    for (k, (a, x)) in got.iter().zip(w).enumerate() {
                        assert_eq!(a.to_bits(), x.to_bits(), "B={b} %{}[{k}]", g.index());
                    }
                }
            }
        }
    }
}

const DIAGONALS: &str = r#"
loss Diag() {
    input x: [N, N]
    let g[j, j2] = sum(i | j == j2) x[i, j] * x[i, j2]
    let h[a, b: N] = max(k | b == a) x[a, k]
    sum(p, q) (g[p, q] * 2.0 + exp(h[q, p]) + g[q, q]) + sum(p) h[p, p]
}
"#;

/// A reduction whose filter compares two output indices (`j == j2`: the
/// gradient of a diagonal read) is lowered to the reduction on the diagonal
/// and reads of it to `if a == b then d[a] else empty`: the same values as
/// the interpreter, every node kept in a full run, on one thread and three,
/// and in a lean run; its gradient too.
#[test]
fn reductions_on_a_diagonal_agree() {
    let (full, code) = jit_of(DIAGONALS, None);
    for n in [1usize, 6, 37] {
        let x: Vec<f64> = (0..n * n)
            .map(|k| ((k * 13 % 29) as f64 * 0.41).sin())
            .collect();
        let tensors = TensorMap::from([(
            "x".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![n, n], x),
        )]);
        let bound = bind_or(&full, &tensors).unwrap();
        both_on_one_and_three_threads(&full, &bound, &code, &format!("N={n}"));
        let want = interp::evaluate::<f64>(&full, &bound).unwrap();
        let lean = code
            .run_with::<f64>(&bound, jit::RunOptions::lean())
            .unwrap();
        let (w, g) = (want.outputs[0].1, lean.outputs[0].1);
        assert!(
            (w - g).abs() <= 1e-12 * w.abs(),
            "N={n}: lean {g}, interp {w}"
        );
        let grad = full.grads[0].1.index();
        let (Tensor::F(w), Tensor::F(g)) = (&want.values[grad], &lean.values[grad]) else {
            panic!("float gradients");
        };
        for (a, b) in g.iter().zip(w.iter()) {
            assert!(
                (a - b).abs() <= 1e-12 * b.abs().max(1.0),
                "N={n}: {a} vs {b}"
            );
        }
    }
}

const FIRSTS: &str = r#"
loss Firsts() {
    input x: [B, N]
    input lab: int[N]
    let over[i] = min(j | x[i, j] > 0.5) j
    let labelled[i] = min(j | float(lab[j] == 1) * x[i, j] < -0.25) j
    let other[i] = min(j | j != i and x[i, j] != 0.0) j
    sum(i) float(over[i] + 2 * labelled[i] + 3 * other[i])
}
"#;

/// `min(j | filter) j` (the gradient of max/min picks its argument this way)
/// stops at the first passing `j`, in lanes (the first lane of the first
/// step where any passes) and in the scalar tail: the interpreter's index at
/// every row length from 1 to 11, with hits in every lane and rows where
/// nothing passes (the empty value).
#[test]
fn the_first_passing_index_is_found_in_lanes() {
    let (full, code) = jit_of(FIRSTS, None);
    let firsts = nodes_where(&full, |id| {
        full.node(*id).dtype == lossc::ir::DType::Int
            && !full.node(*id).shape.is_empty()
            && matches!(full.node(*id).kind, lossc::ir::NodeKind::Comp(_))
    });
    assert_eq!(firsts.len(), 3, "{firsts:?}");
    for id in &firsts {
        assert!(code.is_vectorised(*id), "%{} runs in lanes", id.index());
    }
    let b = 9usize;
    for n in 1..=11usize {
        let x: Vec<f64> = (0..b * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                // Row i's first hit of `x > 0.5` at column i (none past n).
                if j == i {
                    0.75
                } else if (j + i) % 4 == 0 {
                    -0.5
                } else {
                    0.0
                }
            })
            .collect();
        let lab: Vec<i64> = (0..n).map(|j| (j % 3 == 2) as i64).collect();
        let tensors = TensorMap::from([
            (
                "x".to_string(),
                lossc::tensor_io::HostTensor::f64(vec![b, n], x),
            ),
            (
                "lab".to_string(),
                lossc::tensor_io::HostTensor::i64(vec![n], lab),
            ),
        ]);
        let bound = bind_or(&full, &tensors).unwrap();
        let want = interp::evaluate::<f64>(&full, &bound).unwrap();
        for got in [
            code.run::<f64>(&bound).unwrap(),
            code.run_with::<f64>(
                &bound,
                jit::RunOptions {
                    threads: 3,
                    ..jit::RunOptions::full()
                },
            )
            .unwrap(),
        ] {
            for id in &firsts {
                let (Tensor::I(w), Tensor::I(g)) =
                    (&want.values[id.index()], &got.values[id.index()])
                else {
                    panic!("int nodes");
                };
                assert_eq!(w, g, "N={n} %{}", id.index());
            }
        }
        both::<f32>(&full, &bound, &code, RTOL_F32).unwrap_or_else(|e| panic!("N={n} f32: {e}"));
    }
}

const PAIRS: &str = r#"
loss Pairs() {
    input s: [B]
    input lab: [B]
    let r[i] = sum(j | lab[i] < lab[j]) exp(s[i] * s[j])
    let c[j] = sum(i | lab[i] < lab[j]) (-2.0 * exp(s[i] * s[j]))
    sum(i) (r[i] * s[i]) + sum(j) (c[j] * lab[j])
}
"#;

/// A row sum and a column sum over one domain and filter (a pairwise term's
/// gradient with respect to both sides; CoSENT's, whose body separates,
/// runs sorted instead: `ranked`) run as one pass: each
/// `(i, j)` adds to its row and, into a buffer of the thread's own, to its
/// column. Rows split across three threads at B = 700 (uneven blocks) and
/// odd sizes agree with the interpreter, in lanes and the scalar tail.
#[test]
fn a_row_sum_and_a_column_sum_of_one_domain_run_as_one_pass() {
    let (full, code) = jit_of(PAIRS, None);
    let sums = nodes_where(&full, |id| {
        full.node(*id)
            .name
            .as_deref()
            .is_some_and(|n| n == "r" || n == "c")
    });
    assert_eq!(sums.len(), 2, "{sums:?}");
    assert!(
        code.fused_groups().contains(&sums),
        "{sums:?} not one pass: {:?}",
        code.fused_groups()
    );
    for b in [1usize, 5, 17, 700] {
        let bound = bind_or(&full, &scores_and_labels(b, None)).unwrap();
        both_on_one_and_three_threads(&full, &bound, &code, &format!("B={b}"));
    }
}

/// Inputs `s` (scores in [-4, 4]) and `lab` (labels 0..4, with ties) of `b`
/// elements; `lab[b / 2]` is `negative` where given.
fn scores_and_labels(b: usize, negative: Option<f64>) -> TensorMap {
    let s: Vec<f64> = (0..b)
        .map(|k| ((k * 31 % 23) as f64 * 0.37).sin() * 4.0)
        .collect();
    let lab: Vec<f64> = (0..b)
        .map(|k| match negative {
            Some(v) if k == b / 2 => v,
            _ => (k * 7 % 5) as f64,
        })
        .collect();
    TensorMap::from([
        (
            "s".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![b], s),
        ),
        (
            "lab".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![b], lab),
        ),
    ])
}

const RANKED: &str = r#"
loss Ranked() {
    input s: [B]
    input lab: [B]
    let r[i] = sum(j | lab[i] < lab[j]) exp(s[i] - s[j])
    let c[j] = sum(i | lab[i] <= lab[j]) (-2.0 * s[i] * exp(s[j] - 2.0 * s[i] + 0.5))
    let m[i] = logsumexp(j | log(lab[j]) > log(lab[i])) (3.0 * s[j] - s[i])
    let t = logsumexp(i, j | lab[i] >= lab[j] + 1.0) (s[i] - s[j])
    sum(i) (r[i] * s[i]) + sum(j) (c[j] * lab[j]) + sum(i) exp(m[i] - 4.0) + softplus(t)
}
"#;

/// Pair reductions filtered by a rank comparison, with a body that
/// separates into a part of each side (CoSENT's loss and gradient), run as
/// a sort and a running logsumexp (`ranked_nodes`); the others as loops.
/// Every comparison, keys computed from a label (`lab[j] + 1.0`,
/// `log(lab[i])`), rows with no passing pair, ties, and a NaN key (`log` of
/// a negative label: the loop nest runs instead) agree with the
/// interpreter, forward and gradient.
#[test]
fn a_rank_filtered_pair_reduction_runs_sorted() {
    let (full, code) = jit_of(RANKED, None);
    let named = |names: &[&str]| {
        nodes_where(&full, |id| {
            full.node(*id)
                .name
                .as_deref()
                .is_some_and(|n| names.contains(&n))
        })
    };
    let ranked = code.ranked_nodes();
    for id in named(&["r", "m", "t"]) {
        assert!(
            ranked.contains(&id),
            "%{} not sorted: {ranked:?}",
            id.index()
        );
    }
    // `c`'s factor `-2.0 * s[i]` is of the reduced side: it does not
    // separate. Of the gradient's pair sums, four do (`t`'s two, one each
    // of `m`'s and `r`'s): seven in all.
    assert!(!ranked.contains(&named(&["c"])[0]), "{ranked:?}");
    assert_eq!(ranked.len(), 7, "{ranked:?}");
    for b in [1usize, 5, 17, 300] {
        for nan in [false, true] {
            let tensors = scores_and_labels(b, nan.then_some(-1.0));
            let bound = bind_or(&full, &tensors).unwrap();
            both_on_one_and_three_threads(&full, &bound, &code, &format!("B={b} nan={nan}"));
        }
    }
}

/// Every float node's values from two evaluations, as f64 (exact for f32).
fn float_nodes<F: Real>(
    want: &Evaluation<F>,
    got: &Evaluation<F>,
) -> Vec<(Vec<f64>, Vec<f64>, usize)> {
    want.values
        .iter()
        .zip(&got.values)
        .enumerate()
        .filter_map(|(i, pair)| match pair {
            (Tensor::F(w), Tensor::F(g)) => Some((
                w.iter().map(|x| f64_of(*x)).collect(),
                g.iter().map(|x| f64_of(*x)).collect(),
                i,
            )),
            _ => None,
        })
        .collect()
}

const TWO_SIDED: &str = r#"
loss Gram() {
    input x: [N, D]
    input w: [N, N]
    let g[i, j] = sum(k) x[i, k] * x[j, k]
    sum(i, j) w[i, j] * g[i, j] * g[i, j]
}

loss Given() {
    input m: [N, N]
    input x: [N, D]
    let l[i, k] = sum(j) m[i, j] * x[j, k]
    let r[j, k] = sum(i) m[i, j] * x[i, k]
    let s[p, q] = l[p, q] + r[p, q]
    sum(p, q) s[p, q] * s[p, q] + sum(p, q) exp(s[p, q] * 0.1)
}

loss Square() {
    input m: [N, N]
    let l[i, k] = sum(j) m[i, j] * m[j, k]
    let r[j, k] = sum(i) m[i, j] * m[i, k]
    let s[p, q] = l[p, q] + r[p, q]
    sum(p, q) s[p, q] * s[p, q]
}
"#;

/// A gradient through a square matrix read both ways (`sum(j) M[i, j]
/// X[j, k] + sum(i) M[i, j] X[i, k]`, the Batch* triplet losses') runs in a
/// lean run as one GEMM over `M + Mᵀ`: with `M` summed in place (`Gram`:
/// nothing else reads the gradient of the Gram matrix) and into a buffer of
/// its own (`Given`: `M` is an input). Loss and gradients agree with the
/// interpreter at odd sizes, across tiles of the transpose (N = 70), on one
/// thread and three, in f64 and f32.
#[test]
fn a_matrix_read_both_ways_runs_as_one_gemm_over_its_symmetric_sum() {
    // `Given` has the pattern twice: its forward (`l`, `r`) and its gradient
    // with respect to `x`. `Square`'s forward reads `M` as `X` too, which
    // would change under the GEMM: not taken.
    for (name, expected) in [("Gram", 1), ("Given", 2), ("Square", 0)] {
        let graph = compile_src(TWO_SIDED, Some(name), &lossc::Params::new())
            .unwrap_or_else(|e| panic!("{e}"));
        let full = lossc::differentiate(&graph).0;
        for (n, d) in [(1usize, 2usize), (5, 3), (17, 4), (70, 9)] {
            let x: Vec<f64> = (0..n * d)
                .map(|k| ((k * 17 % 31) as f64 * 0.29).sin())
                .collect();
            let m: Vec<f64> = (0..n * n)
                .map(|k| ((k * 7 % 41) as f64 * 0.13).cos())
                .collect();
            let square = lossc::tensor_io::HostTensor::f64(vec![n, n], m);
            let tensors = TensorMap::from([
                (
                    "x".to_string(),
                    lossc::tensor_io::HostTensor::f64(vec![n, d], x),
                ),
                ("w".to_string(), square.clone()),
                ("m".to_string(), square),
            ]);
            let tensors: TensorMap = tensors
                .into_iter()
                .filter(|(k, _)| full.nodes.iter().any(|node| matches!(&node.kind, lossc::ir::NodeKind::Input { name, .. } if name == k)))
                .collect();
            let bound = bind_or(&full, &tensors).unwrap();
            let want = interp::evaluate::<f64>(&full, &bound).unwrap();
            for (precision, rtol) in [(Precision::F64, 1e-12), (Precision::F32, 1e-5)] {
                let code = jit::compile(&full, precision).unwrap();
                for threads in [1, 3] {
                    let opts = jit::RunOptions {
                        threads,
                        ..jit::RunOptions::lean()
                    };
                    let pairs = code.two_sided_products(&bound, opts).unwrap();
                    assert_eq!(pairs.len(), expected, "{name} N={n}: {pairs:?}");
                    let case = format!("{name} N={n} {} threads={threads}", precision.name());
                    let grads: Vec<(Vec<f64>, Vec<f64>)> = match precision {
                        Precision::F64 => {
                            let got = code.run_with::<f64>(&bound, opts).unwrap();
                            lean_against(&full, &want, &got, &case, rtol)
                        }
                        Precision::F32 => {
                            let want32 = interp::evaluate::<f32>(&full, &bound).unwrap();
                            let got = code.run_with::<f32>(&bound, opts).unwrap();
                            lean_against(&full, &want32, &got, &case, rtol)
                        }
                    };
                    assert!(!grads.is_empty(), "{case}: no gradients");
                }
            }
        }
    }
}

/// A lean run's loss and gradients against the interpreter's, each within
/// `rtol` of the largest magnitude of its tensor; the gradients as f64.
fn lean_against<F: Real>(
    full: &Graph,
    want: &Evaluation<F>,
    got: &Evaluation<F>,
    case: &str,
    rtol: f64,
) -> Vec<(Vec<f64>, Vec<f64>)> {
    let (w, g) = (f64_of(want.outputs[0].1), f64_of(got.outputs[0].1));
    assert!(
        (w - g).abs() <= rtol * w.abs().max(1.0),
        "{case}: loss {g}, interp {w}"
    );
    full.grads
        .iter()
        .map(|(input, id)| {
            let (Tensor::F(w), Tensor::F(g)) = (&want.values[id.index()], &got.values[id.index()])
            else {
                panic!("{case}: float gradients");
            };
            let w: Vec<f64> = w.iter().map(|x| f64_of(*x)).collect();
            let g: Vec<f64> = g.iter().map(|x| f64_of(*x)).collect();
            let scale = w.iter().fold(1e-300f64, |m, x| m.max(x.abs()));
            for (k, (a, b)) in g.iter().zip(&w).enumerate() {
                assert!(
                    (a - b).abs() <= rtol * scale,
                    "{case}: grad {input}[{k}] {a} vs {b}"
                );
            }
            (w, g)
        })
        .collect()
}

const GRAM_DIAGONAL: &str = r#"
loss Distances() {
    input x: [N, D]
    let g[i, j] = sum(k) x[i, k] * x[j, k]
    let sq[i, j] = g[j, j] - 2.0 * g[i, j] + g[i, i]
    sum(i, j) exp(-0.1 * sq[i, j]) * float(i != j)
}
"#;

/// Reads of a square node's diagonal `g[j, j]` (distances from a Gram
/// matrix, the Batch* triplet losses') read a vector of the diagonal
/// instead: the interpreter's values in full and lean runs, at odd sizes,
/// on one thread and three, and streamed in blocks of 3 rows.
#[test]
fn diagonal_reads_of_a_square_node_agree() {
    let (full, code) = jit_of(GRAM_DIAGONAL, None);
    let g = nodes_where(&full, |id| full.node(*id).name.as_deref() == Some("g"));
    assert_eq!(
        code.diagonal_vectors(),
        g,
        "the Gram matrix's diagonal is not a vector"
    );
    for (n, d) in [(1usize, 2usize), (6, 3), (37, 5)] {
        let x: Vec<f64> = (0..n * d)
            .map(|k| ((k * 11 % 19) as f64 * 0.37).sin())
            .collect();
        let tensors = TensorMap::from([(
            "x".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![n, d], x),
        )]);
        let bound = bind_or(&full, &tensors).unwrap();
        both_on_one_and_three_threads(&full, &bound, &code, &format!("N={n}"));
        let want = interp::evaluate::<f64>(&full, &bound).unwrap();
        for opts in [
            jit::RunOptions::lean(),
            jit::RunOptions {
                streaming: jit::Streaming::Always,
                tile_rows: Some(3),
                ..jit::RunOptions::lean()
            },
        ] {
            let got = code.run_with::<f64>(&bound, opts).unwrap();
            lean_against(&full, &want, &got, &format!("N={n} {opts:?}"), 1e-12);
        }
    }
}

const HOISTED: &str = r#"
loss Hoisted() {
    input x: [B, D]
    input w: [B]
    let n[i] = sum(k) x[i, k] * x[i, k]
    let s[i] = sum(k) (if w[i] > 0.0 then x[i, k] * w[i] / sqrt(n[i]) else 0.0)
    sum(i) s[i] * w[i]
}
"#;

/// A sum whose factors and condition do not depend on its reduced index
/// (`opt::hoist`) runs as a plain sum with the factors applied once: the
/// same values as the terms' sum on both backends, forward and gradient,
/// and over an empty range (D = 0) its empty value 0, not the NaN that
/// `0 / sqrt(0)` would give.
#[test]
fn factors_free_of_a_sums_index_are_applied_once() {
    let (full, code) = jit_of(HOISTED, None);
    let hoisted = nodes_where(&full, |id| {
        full.node(*id)
            .name
            .as_deref()
            .is_some_and(|n| n.ends_with(".sum"))
    });
    assert!(!hoisted.is_empty(), "nothing hoisted");
    for (b, d) in [(1i64, 1i64), (3, 5), (17, 4), (4, 0)] {
        let dims = BTreeMap::from([("B".to_string(), b), ("D".to_string(), d)]);
        let tensors = bind::random_inputs(&full, 11, &dims).unwrap();
        let bound = bind_or(&full, &tensors).unwrap();
        let (got, _) = both::<f64>(&full, &bound, &code, RTOL_F64)
            .unwrap_or_else(|e| panic!("B={b} D={d}: {e}"));
        let loss = got.outputs[0].1;
        if d == 0 {
            assert_eq!(loss, 0.0, "B={b} D=0: an empty sum is 0");
        } else {
            assert!(loss.is_finite(), "B={b} D={d}: {loss}");
        }
    }
}

/// The widths of a graph's score contractions: float sums over one literal
/// extent into a matrix of symbolic shape (the backward GEMMs reduce over a
/// symbolic batch dim instead).
fn literal_contraction_widths(graph: &Graph) -> Vec<i64> {
    let mut widths: Vec<i64> = graph
        .nodes
        .iter()
        .filter_map(|node| {
            let lossc::ir::NodeKind::Comp(c) = &node.kind else {
                return None;
            };
            let r = c.reduce.as_ref()?;
            let symbolic = node.shape.len() == 2 && node.shape.iter().all(|d| d.as_lit().is_none());
            // Two different matrices (a norm reads one node twice).
            let matrix = |e: &lossc::ir::Expr| matches!(e, lossc::ir::Expr::Read { at, .. } if at.len() == 2);
            let two = match &c.body {
                lossc::ir::Expr::Binary(lossc::ir::BinOp::Mul, a, b) => {
                    matrix(a) && matrix(b) && a.reads() != b.reads()
                }
                _ => false,
            };
            (symbolic && two && r.op == lossc::ir::RedOp::Sum && r.over.len() == 1)
                .then(|| r.over[0].1.as_lit())
                .flatten()
        })
        .collect();
    widths.sort_unstable();
    widths
}

/// Matryoshka's truncated score contractions share their work
/// (`opt::prefix`): the widths 32, 16, 8 and 4 cost one contraction per
/// block between them, 32 columns in all instead of 60, and the gradient of
/// the truncations runs in pieces (`opt::piecewise`). Both backends agree,
/// with embeddings wider than the largest width (the last piece not empty),
/// and the gradient matches central differences.
#[test]
fn prefix_contractions_cost_the_largest_width_once() {
    let params =
        params_of(r#"{"loss":"MultipleNegativesRankingLoss","matryoshka_dims":[32,16,8,4]}"#);
    let graph = compile_std("MatryoshkaLoss", &params).unwrap();
    let full = lossc::differentiate(&graph).0;
    assert_eq!(literal_contraction_widths(&full), vec![4, 4, 8, 16]);
    let pieces = nodes_where(&full, |id| {
        full.node(*id)
            .name
            .as_deref()
            .is_some_and(|n| n.ends_with(".piece"))
    });
    assert!(pieces.len() >= 10, "{} pieces", pieces.len());
    let code = jit::compile(&full, Precision::F64).unwrap();
    for (b, d, k) in [(1i64, 32i64, 0i64), (3, 37, 1), (17, 33, 3)] {
        let dims = BTreeMap::from([
            ("B".to_string(), b),
            ("D".to_string(), d),
            ("K".to_string(), k),
        ]);
        let tensors = bind::random_inputs(&full, 5, &dims).unwrap();
        let bound = bind_or(&full, &tensors).unwrap();
        both_on_one_and_three_threads(&full, &bound, &code, &format!("B={b} D={d} K={k}"));
    }
    let dims = BTreeMap::from([
        ("B".to_string(), 3),
        ("D".to_string(), 34),
        ("K".to_string(), 1),
    ]);
    let tensors = bind::random_inputs(&full, 9, &dims).unwrap();
    let (_, grads) = grads_of::<f64>(&graph, &tensors).unwrap();
    let fd = fd_grads(&graph, &tensors, 1e-6);
    for (name, shape, got) in grads {
        let want = &fd.iter().find(|(n, _)| *n == name).expect("a difference").1;
        let err = grad_error(&got, want, &shape, 1e-6, false);
        assert!(err <= 1.0, "d {name}: {err} of the allowance");
        if name == "anchor" {
            // Columns past the largest width get no gradient.
            assert!(got
                .chunks(34)
                .all(|row| row[32..].iter().all(|x| *x == 0.0)));
        }
    }

    // Matryoshka2d with every width: each layer read at a fixed index
    // (`x[L - 1, b, t]`, `x[2, b, t]`) is its own group.
    let params = params_of(
        r#"{"loss":"MultipleNegativesRankingLoss","matryoshka_dims":[32,16,8,4],"n_dims_per_step":-1}"#,
    );
    let graph = compile_std("Matryoshka2dLoss", &params).unwrap();
    let full = lossc::differentiate(&graph).0;
    assert_eq!(
        literal_contraction_widths(&full),
        vec![4, 4, 4, 4, 8, 8, 16, 16]
    );
    let code = jit::compile(&full, Precision::F64).unwrap();
    let dims = BTreeMap::from([
        ("B".to_string(), 5),
        ("D".to_string(), 33),
        ("K".to_string(), 1),
        ("L".to_string(), 3),
    ]);
    let tensors = bind::random_inputs(&full, 3, &dims).unwrap();
    let bound = bind_or(&full, &tensors).unwrap();
    both_on_one_and_three_threads(&full, &bound, &code, "Matryoshka2d");
}

const STEPS: &str = r#"
loss Truncated() {
    input x: [B, N]
    let a = truncate(x, 2)
    let b = truncate(x, 5)
    sum(i, j) a[i, j] * a[i, j] + sum(i, j) exp(b[i, j])
}
loss Unbounded() {
    input x: [B, N]
    sum(i, j) ((if j < 2 then x[i, j] * x[i, j] else 0.0) + (if j < 5 then exp(x[i, j]) else 0.0))
}
"#;

/// `opt::piecewise` splits a gradient whose terms switch at fixed columns
/// into pieces, and only where every run that gets there has the columns:
/// the truncations read `x[i, j]` for `j < 5`, so `N >= 5`; with the same
/// `if`s and no such read, `N = 3` must still run, so nothing is split.
#[test]
fn terms_that_switch_at_fixed_columns_run_in_pieces() {
    let (full, code) = jit_of(STEPS, Some("Truncated"));
    let grad = full.grads[0].1;
    let lossc::ir::NodeKind::Concat { axis: 1, parts } = &full.node(grad).kind else {
        panic!("the gradient is not split: {:?}", full.node(grad).kind);
    };
    assert_eq!(parts.len(), 3, "pieces 0..2, 2..5 and 5..N");
    for n in [5usize, 6, 9] {
        let x: Vec<f64> = (0..3 * n).map(|k| (k as f64 * 0.41).cos()).collect();
        let tensors = TensorMap::from([(
            "x".to_string(),
            lossc::tensor_io::HostTensor::f64(vec![3, n], x.clone()),
        )]);
        let bound = bind_or(&full, &tensors).unwrap();
        both_on_one_and_three_threads(&full, &bound, &code, &format!("N={n}"));
        let got = code.run::<f64>(&bound).unwrap();
        let Tensor::F(g) = &got.values[grad.index()] else {
            panic!("a float gradient");
        };
        for (e, (v, x)) in g.iter().zip(&x).enumerate() {
            let j = e % n;
            let want: f64 = if j < 2 { 2.0 * x } else { 0.0 } + if j < 5 { x.exp() } else { 0.0 };
            assert!(
                (v - want).abs() <= 1e-12 * want.abs().max(1.0),
                "N={n} [{e}]: {v} vs {want}"
            );
        }
    }
    // Too few columns: the truncation's own error on both backends, no panic.
    let tensors = TensorMap::from([(
        "x".to_string(),
        lossc::tensor_io::HostTensor::f64(vec![3, 4], vec![0.5; 12]),
    )]);
    let bound = bind_or(&full, &tensors).unwrap();
    match both::<f64>(&full, &bound, &code, RTOL_F64) {
        Err(e) => assert!(e.starts_with("SAME-ERROR"), "{e}"),
        Ok(_) => panic!("N=4 ran"),
    }

    let (full, code) = jit_of(STEPS, Some("Unbounded"));
    let grad = full.grads[0].1;
    assert!(
        matches!(full.node(grad).kind, lossc::ir::NodeKind::Comp(_)),
        "split without a bound on N"
    );
    let tensors = TensorMap::from([(
        "x".to_string(),
        lossc::tensor_io::HostTensor::f64(vec![2, 3], vec![0.5, -1.0, 2.0, 0.25, 0.0, 1.5]),
    )]);
    let bound = bind_or(&full, &tensors).unwrap();
    if let Err(e) = both::<f64>(&full, &bound, &code, RTOL_F64) {
        panic!("N=3: {e}");
    }
}

/// `p` and `q` compute the same thing on different inputs, so their kernels
/// share one native function; each still reports its own node's error.
const TWO_GATHERS: &str = r#"
loss TwoGathers() {
    input u: [B, C]
    input v: [B, E]
    input lu: int[B]
    input lv: int[B]
    let p[i] = exp(u[i, lu[i]])
    let q[i] = exp(v[i, lv[i]])
    sum(i) p[i] * q[i]
}
"#;

#[test]
fn kernels_that_compute_the_same_on_other_nodes_share_a_function() {
    let (full, code) = jit_of(TWO_GATHERS, None);
    let (kernels, functions) = code.kernel_counts();
    assert!(
        functions < kernels,
        "{kernels} kernels compiled to {functions} functions"
    );
    let run = |lu: &str, lv: &str| {
        let tensors = tensors_of(&format!(
            r#"{{"u": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]],
                "v": [[1.0, 2.0], [3.0, 4.0]], "lu": {lu}, "lv": {lv}}}"#
        ));
        let bound = bind_or(&full, &tensors).unwrap();
        both::<f32>(&full, &bound, &code, RTOL_F32).map(|_| ())?;
        both::<f64>(&full, &bound, &code, RTOL_F64).map(|(e, _)| e.outputs[0].1)
    };
    let want = 0.3f64.exp() * 1.0f64.exp() + 0.5f64.exp() * 4.0f64.exp();
    let got = run("[2, 1]", "[0, 1]").unwrap();
    assert!((got - want).abs() < 1e-12 * want, "{got} vs {want}");
    // Column 2 is in range for `u` but not for `v`, and the other way round.
    let err = run("[2, 1]", "[2, 1]").unwrap_err();
    assert!(
        err.starts_with("SAME-ERROR LC0506: index 2 is out of range for dim 1 (size 2) of `v`"),
        "{err}"
    );
    let err = run("[3, 1]", "[0, 1]").unwrap_err();
    assert!(
        err.starts_with("SAME-ERROR LC0506: index 3 is out of range for dim 1 (size 3) of `u`"),
        "{err}"
    );
}
