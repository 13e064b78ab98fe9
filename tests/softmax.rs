//! `opt::softmax`: a logsumexp's exponentials computed once for the softmax
//! its gradient reads. The rewritten gradient program must give the
//! logsumexp bit for bit and the softmax to rounding, on ordinary rows and
//! on the rows where the shift is no number (all `-inf`, a `+inf`, a NaN,
//! nothing at all, everything masked), down rows and columns, over a 3-D
//! tensor and under a mask; and it must leave alone the reductions it cannot
//! take (a rank filter, two reduced variables). The JIT runs the rewritten
//! programs as the interpreter does.

mod common;
use common::*;
use lossc::bind;
use lossc::interp::{self, Evaluation};
use lossc::ir::{Expr, Graph, NodeKind, RedOp, UnOp};

/// The gradient program without and with the pass, and how often it fired.
fn both(src: &str) -> (Graph, Graph, usize) {
    let graph = compile_src(src, None, &params_of("{}")).unwrap_or_else(|e| panic!("{e}"));
    let (fwd, _) = lossc::opt::optimize(&graph);
    let grad = lossc::grad::grad(&fwd);
    let (plain, _) = lossc::opt::optimize(&grad);
    let (shared, report) = lossc::opt::optimize_gradient(&grad);
    lossc::ir::verify::verify(&shared).expect("verifies");
    let fired = report.fired.get("softmax").copied().unwrap_or(0);
    (plain, shared, fired)
}

fn evaluate(g: &Graph, json: &str) -> (Evaluation<f64>, Vec<(String, Vec<f64>)>) {
    let tensors = tensors_of(json);
    let bound = bind::bind(g, &tensors)
        .unwrap_or_else(|d| panic!("{:?}", d.iter().map(|x| &x.message).collect::<Vec<_>>()));
    let eval = interp::evaluate::<f64>(g, &bound).unwrap_or_else(|d| panic!("{}", d.message));
    let grads = lossc::gradient_tensors(g, &bound, &eval)
        .into_iter()
        .map(|(k, t)| (k, t.to_f64_vec()))
        .collect();
    (eval, grads)
}

/// Exps of a difference whose right side reads a logsumexp: the softmaxes
/// the pass would share.
fn softmaxes_left(g: &Graph) -> usize {
    let lse = |id: lossc::ir::NodeId| {
        matches!(&g.node(id).kind, NodeKind::Comp(c)
            if c.reduce.as_ref().is_some_and(|r| r.op == RedOp::LogSumExp))
    };
    let mut n = 0;
    for node in &g.nodes {
        if let NodeKind::Comp(c) = &node.kind {
            c.body.walk(&mut |e| {
                if let Expr::Unary(UnOp::Exp, d) = e {
                    if let Expr::Binary(lossc::ir::BinOp::Sub, _, l) = d.as_ref() {
                        if matches!(l.as_ref(), Expr::Read { node, .. } if lse(*node)) {
                            n += 1;
                        }
                    }
                }
            });
        }
    }
    n
}

/// Same value: bit for bit, NaN for NaN.
fn same_bits(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// Same to rounding: NaN and infinities where the other has them, finite
/// values within `ulps` of the largest finite magnitude of their tensor.
fn close(got: &[f64], want: &[f64], ulps: f64) -> Result<(), String> {
    let scale = want
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f64, |m, x| m.max(x.abs()));
    for (k, (a, b)) in got.iter().zip(want).enumerate() {
        let ok = if b.is_finite() {
            (a - b).abs() <= ulps * f64::EPSILON * scale.max(f64::MIN_POSITIVE)
        } else {
            same_bits(*a, *b)
        };
        if !ok {
            return Err(format!("[{k}]: {a:e} against {b:e}"));
        }
    }
    Ok(())
}

/// The pass fires `fired` times, leaves no softmax to share, and keeps the
/// loss and every logsumexp's value bit for bit and the gradients to
/// rounding, on every input.
fn check(src: &str, fired: usize, inputs: &[&str]) {
    let (plain, shared, n) = both(src);
    assert_eq!(
        n,
        fired,
        "rewrites in\n{}",
        lossc::ir::print::print_graph(&shared)
    );
    assert_eq!(softmaxes_left(&shared), 0);
    assert!(softmaxes_left(&plain) > 0, "no softmax to share: {src}");
    for json in inputs {
        let (want, gw) = evaluate(&plain, json);
        let (got, gg) = evaluate(&shared, json);
        for ((name, a), (_, b)) in got.outputs.iter().zip(&want.outputs) {
            assert!(same_bits(*a, *b), "{json}: {name} {a:e} against {b:e}");
        }
        // The logsumexps by name (the pass keeps their names).
        for (id, node) in plain.nodes.iter().enumerate() {
            let Some(name) = &node.name else { continue };
            let is_lse = matches!(&node.kind, NodeKind::Comp(c)
                if c.reduce.as_ref().is_some_and(|r| r.op == RedOp::LogSumExp));
            if !is_lse {
                continue;
            }
            let twin = shared
                .nodes
                .iter()
                .position(|m| m.name.as_ref() == Some(name))
                .expect("the logsumexp keeps its name");
            let (a, b) = (&got.values[twin], &want.values[id]);
            let (interp::Tensor::F(a), interp::Tensor::F(b)) = (a, b) else {
                panic!("float logsumexp");
            };
            for (x, y) in a.iter().zip(b.iter()) {
                assert!(same_bits(*x, *y), "{json}: {name} {x:e} against {y:e}");
            }
        }
        for ((name, a), (_, b)) in gg.iter().zip(&gw) {
            close(a, b, 32.0).unwrap_or_else(|e| panic!("{json}: grad {name}{e}"));
        }
        // The JIT runs the rewritten program as the interpreter does (its
        // sums in lanes: to rounding), special values included.
        let program = lossc::jit::compile(&shared, lossc::jit::Precision::F64).expect("jit");
        let bound = bind::bind(&shared, &tensors_of(json)).expect("binds");
        let jit = program.run::<f64>(&bound).expect("jit runs");
        for ((name, a), (_, b)) in jit.outputs.iter().zip(&got.outputs) {
            close(&[*a], &[*b], 32.0).unwrap_or_else(|e| panic!("{json}: jit {name}{e}"));
        }
        let gj = lossc::gradient_tensors(&shared, &bound, &jit);
        for ((name, a), (_, b)) in gj.iter().zip(&gg) {
            close(&a.to_f64_vec(), b, 32.0)
                .unwrap_or_else(|e| panic!("{json}: jit grad {name}{e}"));
        }
    }
}

/// Rows of `log(u)`: ordinary, with `-inf` entries, all `-inf`, with a NaN;
/// of `1e300 * u * u`: a `+inf` beside finite ones.
const ROWS: &[&str] = &[
    r#"{"u": [[0.5, 2.0, 1.5], [0.0, 3.0, 0.25], [0.0, 0.0, 0.0], [1.0, -1.0, 2.0]], "w": [1.0, -2.0, 0.5, 3.0]}"#,
    r#"{"u": [[1e10, 1.0, 2.0], [0.1, 0.2, 0.3], [1e-300, 1e-300, 5.0], [1e-160, 1e-160, 1e-160]], "w": [0.25, 1.0, -1.0, 2.0]}"#,
];

#[test]
fn row_logsumexp_of_special_values() {
    let src = "loss L() { input u: [B, N]  input w: [B]
        let l[i] = logsumexp(c) log(u[i, c])
        sum(i) w[i] * l[i] }";
    check(src, 1, ROWS);
    let inf = "loss L() { input u: [B, N]  input w: [B]
        let l[i] = logsumexp(c) 1e300 * u[i, c] * u[i, c]
        sum(i) w[i] * l[i] }";
    check(inf, 1, ROWS);
}

/// Where the scores dwarf `log(3)`, `L` rounds to the shared maximum and
/// the old softmax `exp(x - L)` gave each of three tied entries 1; the
/// shared exponentials give each its third.
#[test]
fn tied_huge_scores_keep_their_share() {
    let src = "loss L() { input u: [B, N]  input w: [B]
        let l[i] = logsumexp(c) 1e300 * u[i, c] * u[i, c]
        sum(i) w[i] * l[i] }";
    let (plain, shared, _) = both(src);
    let json = r#"{"u": [[7.0, 7.0, 7.0]], "w": [2.0]}"#;
    // d/du of w * l: w * softmax * 2e300 * u, softmax 1/3.
    let want = 2.0 / 3.0 * 2e300 * 7.0;
    let (_, g) = evaluate(&shared, json);
    for x in &g[0].1 {
        assert!((x - want).abs() <= 1e-15 * want, "{x:e} against {want:e}");
    }
    let (_, g) = evaluate(&plain, json);
    assert!((g[0].1[0] - 3.0 * want).abs() <= 1e-15 * want);
}

#[test]
fn empty_rows_and_column_logsumexp() {
    // N = 0: every row is the empty value, -inf.
    let src = "loss L() { input u: [B, N]  input w: [B]
        let l[i] = logsumexp(c) u[i, c]
        sum(i) w[i] * exp(l[i]) }";
    check(src, 1, &[r#"{"u": [[], []], "w": [1.0, 2.0]}"#]);
    // Down the columns (ContrastiveTension's second direction) and along
    // the rows of the same matrix.
    let cols = "loss L() { input s: [B, B]
        let r[i] = logsumexp(j) s[i, j]
        let c[j] = logsumexp(i) s[i, j]
        mean(i) (r[i] - s[i, i]) + mean(j) (c[j] - s[j, j]) }";
    check(
        cols,
        2,
        &[r#"{"s": [[1.0, 2.0, -3.0], [0.5, 40.0, 0.0], [-1.0, 2.5, 3.0]]}"#],
    );
}

#[test]
fn three_dims_and_a_mask() {
    // A language model's token cross-entropy over [B, T, V].
    let lm = "loss L() { input x: [B, T, V]  input y: int[B, T]
        mean(b, t) (logsumexp(v) x[b, t, v] - x[b, t, y[b, t]]) }";
    check(
        lm,
        1,
        &[
            r#"{"x": [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], [[2.0, 2.0, 2.0], [9.0, -9.0, 0.1]]], "y": [[0, 2], [1, 0]]}"#,
        ],
    );
    // GIST's false-negative mask, a row masked entirely included.
    let masked = "loss L() { input s: [B, N]  input m: [B, N]
        let keep[i, c] = m[i, c] > 0.5
        let l[i] = logsumexp(c | keep[i, c]) s[i, c] / 0.05
        sum(i) l[i] * 0.5 }";
    check(
        masked,
        1,
        &[
            r#"{"s": [[0.1, 0.9, -0.3], [0.2, 0.4, 0.6], [1.0, 0.0, 0.5]], "m": [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]}"#,
        ],
    );
}

#[test]
fn rank_filters_and_pairs_are_left_alone() {
    // CoSENT's pair logsumexp (two reduced variables) and a rank filter,
    // which the JIT runs sorted: no rewrite.
    for src in [
        "loss L() { input s: [B]  input y: [B]
            logsumexp(i, j | y[i] < y[j]) (s[i] - s[j]) }",
        "loss L() { input s: [B]  input y: [B]
            sum(i) logsumexp(j | y[i] < y[j]) (s[j] - s[i]) }",
    ] {
        let (plain, shared, n) = both(src);
        assert_eq!(n, 0, "{src}");
        assert_eq!(plain, shared);
    }
}

/// MNRL's gradient program reads its scores' exponentials once: the
/// softmax is `E * Q`, and there is one exponential of the scores.
#[test]
fn mnrl_reads_its_exponentials_once() {
    let graph = compile_std("MultipleNegativesRankingLoss", &params_of("{}")).expect("compiles");
    let (full, report) = lossc::differentiate(&graph);
    assert_eq!(report.fired.get("softmax"), Some(&1));
    assert_eq!(softmaxes_left(&full), 0);
    let exps: usize = full
        .nodes
        .iter()
        .filter_map(|n| match &n.kind {
            NodeKind::Comp(c) => Some(c),
            _ => None,
        })
        .map(|c| {
            let mut k = 0;
            c.body
                .walk(&mut |e| k += matches!(e, Expr::Unary(UnOp::Exp, _)) as usize);
            k
        })
        .sum();
    assert_eq!(exps, 1, "{}", lossc::ir::print::print_graph(&full));
}
