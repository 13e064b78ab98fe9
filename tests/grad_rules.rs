//! The derivative table (`src/grad/rules.rs`) and every adjoint construct of
//! `src/grad`, one test each, on small fixed inputs.
//!
//! Smooth cases are checked three ways: against a hand-computed gradient,
//! against central differences in f64 (`common::fd_grads`), and by
//! `lossc::gradcheck::check` (no kinks, worst error <= 1e-6). The conventions
//! at kinks and ties (relu'(0) = 0, |x|'(0) = 0, sqrt'(0) = 0, a `maximum`
//! tie split in half, a `clamp_min` tie sent to x, max/min reductions sending
//! everything to the lowest tied index) are checked exactly, never by finite
//! differences, which have no answer there.

#![allow(clippy::needless_range_loop)] // index-heavy reference formulas read best as loops

mod common;
use common::*;
use lossc::gradcheck;
use std::collections::BTreeMap;

struct Run {
    loss: f64,
    grads: BTreeMap<String, Vec<f64>>,
}

impl Run {
    fn grad(&self, name: &str) -> &[f64] {
        self.grads.get(name).unwrap_or_else(|| {
            panic!(
                "no gradient for `{name}`; have {:?}",
                self.grads.keys().collect::<Vec<_>>()
            )
        })
    }
}

fn compile(src: &str) -> lossc::ir::Graph {
    compile_src(src, None, &params_of("{}")).unwrap_or_else(|e| panic!("{e}"))
}

/// The gradient program's values (f64) for every float input.
fn symbolic(src: &str, json: &str) -> Run {
    let graph = compile(src);
    let tensors = tensors_of(json);
    let (loss, grads) = grads_of::<f64>(&graph, &tensors).unwrap_or_else(|e| panic!("{e}"));
    let grads: BTreeMap<String, Vec<f64>> = grads.into_iter().map(|(k, _, v)| (k, v)).collect();
    for (k, v) in &grads {
        assert!(
            v.iter().all(|x| x.is_finite()),
            "gradient of `{k}` is not finite: {v:?}"
        );
    }
    Run { loss, grads }
}

/// `lossc::gradcheck::check` passes with no kinks.
fn gradcheck_passes(src: &str, json: &str) -> gradcheck::Report {
    let graph = compile(src);
    let tensors = tensors_of(json);
    let (full, _) = lossc::differentiate(&graph);
    let report = gradcheck::check(&graph, &full, &tensors, &gradcheck::Options::default())
        .unwrap_or_else(|d| panic!("gradcheck failed to run: {d:?}"));
    assert!(!report.inputs.is_empty(), "gradcheck checked nothing");
    for r in &report.inputs {
        assert!(
            r.worst <= 1e-6 && r.kinks == 0 && r.checks > 0,
            "gradcheck of `{}`: worst {:e} over {} checks, {} kinks\n{src}",
            r.name,
            r.worst,
            r.checks,
            r.kinks
        );
    }
    report
}

/// A smooth case: symbolic == central differences, and gradcheck passes.
fn smooth(src: &str, json: &str) -> Run {
    let run = symbolic(src, json);
    let graph = compile(src);
    let tensors = tensors_of(json);
    let fd = fd_grads(&graph, &tensors, 1e-5);
    assert_eq!(
        fd.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        run.grads.keys().cloned().collect::<Vec<_>>(),
        "gradients are not given for exactly the float inputs"
    );
    for (name, want) in &fd {
        let got = run.grad(name);
        for (j, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "d loss / d {name}[{j}]: symbolic {a}, finite differences {b}\n{src}"
            );
        }
    }
    gradcheck_passes(src, json);
    run
}

/// Within rounding of a hand-computed gradient.
#[track_caller]
fn assert_grad(run: &Run, name: &str, want: &[f64]) {
    let got = run.grad(name);
    assert_eq!(got.len(), want.len(), "d loss / d {name}: length");
    for (j, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
            "d loss / d {name}[{j}] = {a}, expected {b}\n got {got:?}\nwant {want:?}"
        );
    }
}

/// Exactly a hand-computed gradient (conventions at kinks and ties).
#[track_caller]
fn assert_exact(run: &Run, name: &str, want: &[f64]) {
    let got = run.grad(name);
    assert_eq!(got, want, "d loss / d {name}");
}

#[track_caller]
fn assert_loss(run: &Run, want: f64) {
    assert!(
        (run.loss - want).abs() <= 1e-12 * (1.0 + want.abs()),
        "loss {} expected {want}",
        run.loss
    );
}

fn json1(name: &str, xs: &[f64]) -> String {
    format!(r#"{{"{name}": {xs:?}}}"#)
}

fn weights(n: usize) -> Vec<f64> {
    (1..=n).map(|i| i as f64).collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

// ------------------------------------------------------------- unary rows

const XS: [f64; 4] = [0.3, -0.7, 1.2, 2.5];
const POS: [f64; 4] = [0.3, 0.7, 1.2, 2.5];

/// `sum(i) (i + 1) * term` with `term` reading `x[i]`: the gradient is
/// `(i + 1) * d(x_i)`.
fn unary_row(term: &str, xs: &[f64], d: impl Fn(f64) -> f64) {
    let src = format!("loss L() {{ input x: [N]  sum(i) float(i + 1) * {term} }}");
    let run = smooth(&src, &json1("x", xs));
    let want: Vec<f64> = xs
        .iter()
        .zip(weights(xs.len()))
        .map(|(x, w)| w * d(*x))
        .collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn unary_neg() {
    unary_row("-x[i]", &XS, |_| -1.0);
}

#[test]
fn unary_exp() {
    unary_row("exp(x[i])", &XS, f64::exp);
}

#[test]
fn unary_log() {
    unary_row("log(x[i])", &POS, |x| 1.0 / x);
}

#[test]
fn unary_sqrt() {
    unary_row("sqrt(x[i])", &POS, |x| 0.5 / x.sqrt());
}

#[test]
fn unary_abs() {
    unary_row("abs(x[i])", &XS, f64::signum);
}

#[test]
fn unary_relu() {
    unary_row("relu(x[i])", &XS, |x| if x > 0.0 { 1.0 } else { 0.0 });
}

#[test]
fn unary_softplus() {
    unary_row("softplus(x[i])", &XS, sigmoid);
}

#[test]
fn unary_sigmoid() {
    unary_row("sigmoid(x[i])", &XS, |x| sigmoid(x) * (1.0 - sigmoid(x)));
}

#[test]
fn unary_log_sigmoid() {
    unary_row("log_sigmoid(x[i])", &XS, |x| sigmoid(-x));
}

#[test]
fn unary_log_sigmoid_large_arguments() {
    // log_sigmoid(x) = -softplus(-x); its gradient sigmoid(-x) must stay
    // finite and accurate far out on both sides.
    let xs = [-40.0, -5.0, 5.0, 40.0];
    unary_row("log_sigmoid(x[i])", &xs, |x| sigmoid(-x));
}

#[test]
fn unary_tanh() {
    unary_row("tanh(x[i])", &XS, |x| 1.0 - x.tanh() * x.tanh());
}

#[test]
fn unary_composition_chain_rule() {
    // d/dx log(1 + exp(tanh(x)^2)) through four rows.
    unary_row("log(1 + exp(tanh(x[i]) ^ 2))", &XS, |x| {
        let t = x.tanh();
        let e = (t * t).exp();
        e / (1.0 + e) * 2.0 * t * (1.0 - t * t)
    });
}

#[test]
fn unary_detach_gives_zero_gradient() {
    // The loss depends on x only through detach: x gets an explicit zero gradient.
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * exp(detach(x[i])) }";
    let run = symbolic(src, &json1("x", &XS));
    assert_exact(&run, "x", &[0.0; 4]);
    let want: f64 = XS.iter().zip(weights(4)).map(|(x, w)| w * x.exp()).sum();
    assert_loss(&run, want);
}

#[test]
fn unary_detach_whole_let() {
    // w = detach(x^2) is a constant weight: d/dx sum w x = x^2.
    let src = "loss L() { input x: [N]  let w[i] = detach(x[i] ^ 2)  sum(i) w[i] * x[i] }";
    let json = json1("x", &XS);
    let run = symbolic(src, &json);
    let want: Vec<f64> = XS.iter().map(|x| x * x).collect();
    assert_grad(&run, "x", &want);
    let report = gradcheck_passes(src, &json);
    assert!(report.frozen_detach);
}

#[test]
fn unary_float_of_int_has_no_gradient() {
    // float(n) is a constant factor; the int input has no gradient at all.
    let src = "loss L() { input x: [N]  input n: int[N]  sum(i) float(n[i]) * x[i] ^ 2 }";
    let json = r#"{"x": [0.5, -1.0, 2.0], "n": [3, 0, -2]}"#;
    let run = smooth(src, json);
    assert_grad(&run, "x", &[3.0, 0.0, -8.0]);
    assert_eq!(run.grads.len(), 1, "only float inputs have gradients");
}

#[test]
fn unary_float_of_count_has_no_gradient() {
    // count(..) is piecewise constant: d/dx (count(x > 0) * x0) = [count, 0, 0].
    let src = "loss L() { input x: [N]  float(count(j | x[j] > 0.0)) * x[0] }";
    let run = smooth(src, &json1("x", &[0.5, 2.0, -1.0, 3.0]));
    assert_grad(&run, "x", &[3.0, 0.0, 0.0, 0.0]);
}

#[test]
fn unary_not_carries_no_gradient() {
    // `not` sits in a condition: only the selected branch's reads get a gradient.
    let src = "loss L() { input x: [N]  sum(i) if not (x[i] > 0.0) then 2.0 * x[i] else x[i] ^ 3 }";
    let xs = [0.5, -1.0, 2.0];
    let run = smooth(src, &json1("x", &xs));
    assert_grad(&run, "x", &[0.75, 2.0, 12.0]);
}

// ------------------------------------------------------------ unary kinks

#[test]
fn kink_relu_at_zero_is_zero() {
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * relu(x[i]) }";
    let run = symbolic(src, &json1("x", &[0.0, 1.0, -1.0, -0.0]));
    assert_exact(&run, "x", &[0.0, 2.0, 0.0, 0.0]);
}

#[test]
fn kink_abs_at_zero_is_zero() {
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * abs(x[i]) }";
    let run = symbolic(src, &json1("x", &[0.0, 1.5, -1.5, -0.0]));
    assert_exact(&run, "x", &[0.0, 2.0, -3.0, 0.0]);
}

#[test]
fn kink_sqrt_at_zero_is_zero() {
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * sqrt(x[i]) }";
    let run = symbolic(src, &json1("x", &[0.0, 4.0]));
    assert_exact(&run, "x", &[0.0, 0.5]);
}

#[test]
fn kink_euclidean_distance_of_identical_vectors() {
    // ||a - b|| at a == b: sqrt'(0) = 0 gives a zero (not NaN) gradient, as
    // torch's norm does; the other row is (a - b) / ||a - b||.
    let src = "loss L() { input a: [N, D]  input b: [N, D]
        sum(i) sqrt(sum(k) (a[i, k] - b[i, k]) * (a[i, k] - b[i, k])) }";
    let json =
        r#"{"a": [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], "b": [[1.0, 2.0, 3.0], [3.0, 0.0, 4.0]]}"#;
    let run = symbolic(src, json);
    assert_loss(&run, 5.0);
    assert_eq!(&run.grad("a")[..3], &[0.0, 0.0, 0.0]);
    assert_eq!(&run.grad("b")[..3], &[0.0, 0.0, 0.0]);
    let a1 = &run.grad("a")[3..];
    let b1 = &run.grad("b")[3..];
    for (got, want) in a1.iter().zip([-0.6, 0.0, -0.8]) {
        assert!((got - want).abs() < 1e-15, "{a1:?}");
    }
    for (got, want) in b1.iter().zip([0.6, 0.0, 0.8]) {
        assert!((got - want).abs() < 1e-15, "{b1:?}");
    }
}

#[test]
fn kink_triplet_loss_anchor_equals_positive() {
    // TripletLoss (euclidean): d_pos = ||a - p|| = 0 on row 0, so the positive's
    // gradient there is exactly zero and the anchor's is the d_neg part alone.
    let graph = compile_std("TripletLoss", &params_of("{}")).unwrap();
    let json = r#"{"anchor": [[1.0, 2.0], [0.0, 1.0]],
                  "positive": [[1.0, 2.0], [1.0, 1.0]],
                  "negative": [[4.0, 6.0], [0.0, -1.0]]}"#;
    let (_, grads) = grads_of::<f64>(&graph, &tensors_of(json)).unwrap();
    let get = |n: &str| grads.iter().find(|g| g.0 == n).unwrap().2.clone();
    // Row 0: relu(0 - 5 + 5) = relu(0) is a hinge at zero: nothing flows.
    // Row 1: relu(1 - 2 + 5) = 4 > 0; d/dp = (p - a)/|p - a| / B.
    assert_eq!(get("positive"), vec![0.0, 0.0, 0.5, 0.0]);
    assert_eq!(&get("anchor")[..2], &[0.0, 0.0]);
    assert_eq!(&get("negative")[2..], &[0.0, 0.5]);
}

// ------------------------------------------------------------ binary rows

const YS: [f64; 4] = [1.5, 0.5, -1.0, 0.8];

/// `sum(i) (i + 1) * term` with `term` reading `x[i]` and `y[i]`.
fn binary_row(
    term: &str,
    xs: &[f64],
    ys: &[f64],
    dx: impl Fn(f64, f64) -> f64,
    dy: impl Fn(f64, f64) -> f64,
) {
    let src = format!("loss L() {{ input x: [N]  input y: [N]  sum(i) float(i + 1) * ({term}) }}");
    let json = format!(r#"{{"x": {xs:?}, "y": {ys:?}}}"#);
    let run = smooth(&src, &json);
    let w = weights(xs.len());
    let want_x: Vec<f64> = (0..xs.len()).map(|i| w[i] * dx(xs[i], ys[i])).collect();
    let want_y: Vec<f64> = (0..xs.len()).map(|i| w[i] * dy(xs[i], ys[i])).collect();
    assert_grad(&run, "x", &want_x);
    assert_grad(&run, "y", &want_y);
}

#[test]
fn binary_add() {
    binary_row("x[i] * x[i] + y[i]", &XS, &YS, |x, _| 2.0 * x, |_, _| 1.0);
}

#[test]
fn binary_sub() {
    binary_row("x[i] - y[i] * y[i]", &XS, &YS, |_, _| 1.0, |_, y| -2.0 * y);
}

#[test]
fn binary_mul() {
    binary_row("x[i] * y[i]", &XS, &YS, |_, y| y, |x, _| x);
}

#[test]
fn binary_mul_same_read_twice() {
    // x[i] * x[i] reads one position twice: both partials add up.
    let run = smooth(
        "loss L() { input x: [N]  sum(i) x[i] * x[i] * x[i] }",
        &json1("x", &XS),
    );
    let want: Vec<f64> = XS.iter().map(|x| 3.0 * x * x).collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn binary_div() {
    binary_row("x[i] / y[i]", &XS, &YS, |_, y| 1.0 / y, |x, y| -x / (y * y));
}

#[test]
fn binary_pow_both_operands() {
    binary_row(
        "x[i] ^ y[i]",
        &POS,
        &YS,
        |x, y| y * x.powf(y - 1.0),
        |x, y| x.powf(y) * x.ln(),
    );
}

#[test]
fn binary_pow_square() {
    // The special case b = 2 (also at negative x).
    unary_row("x[i] ^ 2", &XS, |x| 2.0 * x);
}

#[test]
fn binary_pow_constant_exponent() {
    // x^3 at negative x: the rule must not take log(x).
    unary_row("x[i] ^ 3", &XS, |x| 3.0 * x * x);
    unary_row("x[i] ^ 0.5", &POS, |x| 0.5 / x.sqrt());
    unary_row("x[i] ^ -1.5", &POS, |x| -1.5 * x.powf(-2.5));
}

#[test]
fn binary_pow_constant_base() {
    unary_row("2.0 ^ x[i]", &XS, |x| 2f64.powf(x) * 2f64.ln());
}

#[test]
fn binary_maximum() {
    binary_row(
        "maximum(x[i], y[i])",
        &XS,
        &YS,
        |x, y| if x > y { 1.0 } else { 0.0 },
        |x, y| if x < y { 1.0 } else { 0.0 },
    );
}

#[test]
fn binary_minimum() {
    binary_row(
        "minimum(x[i], y[i])",
        &XS,
        &YS,
        |x, y| if x < y { 1.0 } else { 0.0 },
        |x, y| if x > y { 1.0 } else { 0.0 },
    );
}

#[test]
fn binary_clamp_min() {
    binary_row(
        "clamp_min(x[i], y[i])",
        &XS,
        &YS,
        |x, y| if x >= y { 1.0 } else { 0.0 },
        |x, y| if x < y { 1.0 } else { 0.0 },
    );
}

#[test]
fn binary_clamp_max() {
    binary_row(
        "clamp_max(x[i], y[i])",
        &XS,
        &YS,
        |x, y| if x <= y { 1.0 } else { 0.0 },
        |x, y| if x > y { 1.0 } else { 0.0 },
    );
}

#[test]
fn binary_clamp_with_constant_bounds() {
    // Away from the bounds: the gradient passes inside, nothing outside.
    let xs = [-2.0, -0.5, 0.5, 3.0];
    unary_row("clamp(x[i] * x[i] * x[i], -1.0, 1.0)", &xs, |x| {
        if x.powi(3).abs() <= 1.0 {
            3.0 * x * x
        } else {
            0.0
        }
    });
}

// ------------------------------------------------------------ binary ties

const TIE_X: &str = r#"{"x": [1.0, 2.0, 3.0], "y": [1.0, 5.0, 0.0]}"#;

fn tie_run(term: &str) -> Run {
    let src = format!("loss L() {{ input x: [N]  input y: [N]  sum(i) float(i + 1) * {term} }}");
    symbolic(&src, TIE_X)
}

#[test]
fn tie_maximum_splits_in_half() {
    let run = tie_run("maximum(x[i], y[i])");
    assert_exact(&run, "x", &[0.5, 0.0, 3.0]);
    assert_exact(&run, "y", &[0.5, 2.0, 0.0]);
}

#[test]
fn tie_minimum_splits_in_half() {
    let run = tie_run("minimum(x[i], y[i])");
    assert_exact(&run, "x", &[0.5, 2.0, 0.0]);
    assert_exact(&run, "y", &[0.5, 0.0, 3.0]);
}

#[test]
fn tie_clamp_min_goes_to_x() {
    let run = tie_run("clamp_min(x[i], y[i])");
    assert_exact(&run, "x", &[1.0, 0.0, 3.0]);
    assert_exact(&run, "y", &[0.0, 2.0, 0.0]);
}

#[test]
fn tie_clamp_max_goes_to_x() {
    let run = tie_run("clamp_max(x[i], y[i])");
    assert_exact(&run, "x", &[1.0, 2.0, 0.0]);
    assert_exact(&run, "y", &[0.0, 0.0, 3.0]);
}

#[test]
fn tie_clamp_at_both_bounds_passes_gradient() {
    // torch.clamp: the gradient passes where lo <= x <= hi, bounds included.
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * clamp(x[i], -1.0, 1.0) }";
    let run = symbolic(src, &json1("x", &[-2.0, -1.0, 0.5, 1.0, 3.0]));
    assert_exact(&run, "x", &[0.0, 2.0, 3.0, 4.0, 0.0]);
}

#[test]
fn tie_clamp_min_of_norm_at_eps_goes_to_norm() {
    // normalize's clamp_min(norm, eps) with norm == eps exactly: like torch,
    // the norm keeps the gradient. Here norm(x) = 0.5 = eps.
    let src = "loss L() { input x: [N]  clamp_min(sqrt(sum(k) x[k] * x[k]), 0.5) }";
    let run = symbolic(src, &json1("x", &[0.3, 0.4]));
    assert_loss(&run, 0.5);
    assert_grad(&run, "x", &[0.6, 0.8]);
}

// ------------------------------------------------------------- reductions

#[test]
fn reduce_sum_nested() {
    // sum(i) (i + 1) * sum(k) x[i, k]^2: 2 (i + 1) x[i, k].
    let src = "loss L() { input x: [N, D]  sum(i) float(i + 1) * (sum(k) x[i, k] * x[i, k]) }";
    let x = [0.5, -1.0, 2.0, 1.5, 0.25, -0.75];
    let run = smooth(src, r#"{"x": [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]}"#);
    let want: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(j, v)| 2.0 * (j / 3 + 1) as f64 * v)
        .collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_sum_over_two_variables() {
    let src = "loss L() { input x: [N, D]  sum(i, k) float(10 * i + k) * exp(x[i, k]) }";
    let x: [f64; 6] = [0.5, -1.0, 2.0, 1.5, 0.25, -0.75];
    let run = smooth(src, r#"{"x": [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]}"#);
    let want: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(j, v)| (10 * (j / 3) + j % 3) as f64 * v.exp())
        .collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_mean() {
    let src = "loss L() { input x: [N, D]  mean(i, k) x[i, k] ^ 2 }";
    let x = [0.5, -1.0, 2.0, 1.5, 0.25, -0.75];
    let run = smooth(src, r#"{"x": [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]}"#);
    let want: Vec<f64> = x.iter().map(|v| 2.0 * v / 6.0).collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_mean_filtered_on_index_divides_by_filtered_count() {
    let src = "loss L() { input x: [N]  mean(i | i != 1) x[i] ^ 2 }";
    let run = smooth(src, &json1("x", &[1.0, 2.0, 3.0, 4.0]));
    assert_loss(&run, 26.0 / 3.0);
    assert_grad(&run, "x", &[2.0 / 3.0, 0.0, 2.0, 8.0 / 3.0]);
}

#[test]
fn reduce_mean_filtered_on_mask_divides_by_filtered_count() {
    let src = "loss L() { input x: [N]  input m: bool[N]  mean(i | m[i]) x[i] * x[i] }";
    let json = r#"{"x": [1.0, 2.0, 3.0, 4.0], "m": [true, false, false, true]}"#;
    let run = smooth(src, json);
    assert_loss(&run, 8.5);
    assert_grad(&run, "x", &[1.0, 0.0, 0.0, 4.0]);
}

#[test]
fn reduce_mean_filtered_per_row() {
    // Row i averages over j with the same label: 1 / |class(i)| each.
    let src = "loss L() { input d: [N, N]  input labels: int[N]
        sum(i) mean(j | labels[j] == labels[i]) d[i, j] ^ 2 }";
    let json = r#"{"d": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], "labels": [0, 1, 0]}"#;
    let run = smooth(src, json);
    assert_grad(&run, "d", &[1.0, 0.0, 3.0, 0.0, 10.0, 0.0, 7.0, 0.0, 9.0]);
}

#[test]
fn reduce_max_tie_goes_to_lowest_index() {
    let src = "loss L() { input x: [N]  max(j) x[j] }";
    assert_exact(
        &symbolic(src, &json1("x", &[1.0, 3.0, 3.0])),
        "x",
        &[0.0, 1.0, 0.0],
    );
    assert_exact(
        &symbolic(src, &json1("x", &[3.0, 1.0, 3.0])),
        "x",
        &[1.0, 0.0, 0.0],
    );
    assert_exact(
        &symbolic(src, &json1("x", &[2.0, 2.0, 2.0, 2.0])),
        "x",
        &[1.0, 0.0, 0.0, 0.0],
    );
}

#[test]
fn reduce_min_tie_goes_to_lowest_index() {
    let src = "loss L() { input x: [N]  min(j) x[j] }";
    assert_exact(
        &symbolic(src, &json1("x", &[2.0, 1.0, 1.0])),
        "x",
        &[0.0, 1.0, 0.0],
    );
    assert_exact(
        &symbolic(src, &json1("x", &[-1.0, 0.0, -1.0])),
        "x",
        &[1.0, 0.0, 0.0],
    );
}

#[test]
fn reduce_max_over_two_variables_tie_goes_to_lowest_row_major_index() {
    let src = "loss L() { input x: [N, M]  max(i, j) x[i, j] }";
    let run = symbolic(src, r#"{"x": [[1.0, 3.0], [3.0, 0.0]]}"#);
    assert_exact(&run, "x", &[0.0, 1.0, 0.0, 0.0]);
    let run = symbolic(src, r#"{"x": [[1.0, 0.0], [3.0, 3.0]]}"#);
    assert_exact(&run, "x", &[0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn reduce_max_per_row() {
    // Each row sends its weight to its own (first) maximum.
    let src = "loss L() { input x: [N, M]  sum(i) float(i + 1) * max(j) x[i, j] }";
    let run = symbolic(
        src,
        r#"{"x": [[1.0, 5.0, 2.0], [4.0, 4.0, 0.0], [-1.0, -2.0, -0.5]]}"#,
    );
    assert_exact(&run, "x", &[0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]);
}

#[test]
fn reduce_max_of_expression_smooth() {
    // Away from ties the max is differentiable: d max_j (x_j y_j).
    let src = "loss L() { input x: [N]  input y: [N]  max(j) x[j] * y[j] }";
    let run = smooth(src, r#"{"x": [1.0, 2.0, -3.0], "y": [0.5, 1.5, -2.5]}"#);
    assert_grad(&run, "x", &[0.0, 0.0, -2.5]);
    assert_grad(&run, "y", &[0.0, 0.0, -3.0]);
}

#[test]
fn reduce_min_of_expression_smooth() {
    let src = "loss L() { input x: [N]  min(j) (exp(x[j]) - x[j]) }";
    let run = smooth(src, &json1("x", &[1.0, 0.1, -2.0]));
    assert_grad(&run, "x", &[0.0, 0.1f64.exp() - 1.0, 0.0]);
}

#[test]
fn reduce_max_filtered_tie_goes_to_lowest_selected_index() {
    // The filter excludes the global maximum at 0; the tie at 1, 2 goes to 1.
    let src = "loss L() { input x: [N]  max(j | j != 0) x[j] }";
    let run = symbolic(src, &json1("x", &[9.0, 3.0, 3.0, 1.0]));
    assert_loss(&run, 3.0);
    assert_exact(&run, "x", &[0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn reduce_min_filtered_tie_goes_to_lowest_selected_index() {
    let src = "loss L() { input x: [N]  input m: bool[N]  min(j | m[j]) x[j] }";
    let json = r#"{"x": [-5.0, 2.0, 1.0, 1.0, 1.0], "m": [false, true, false, true, true]}"#;
    let run = symbolic(src, json);
    assert_loss(&run, 1.0);
    assert_exact(&run, "x", &[0.0, 0.0, 0.0, 1.0, 0.0]);
}

#[test]
fn reduce_logsumexp_is_softmax() {
    let src = "loss L() { input x: [N]  logsumexp(j) x[j] }";
    let xs = [0.5, -1.0, 2.0, 1.0];
    let run = smooth(src, &json1("x", &xs));
    let z: f64 = xs.iter().map(|x| x.exp()).sum();
    assert_loss(&run, z.ln());
    let want: Vec<f64> = xs.iter().map(|x| x.exp() / z).collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_logsumexp_large_values_are_stable() {
    let src = "loss L() { input x: [N]  logsumexp(j) x[j] }";
    let xs = [1000.0, 999.0, -1000.0];
    let run = symbolic(src, &json1("x", &xs));
    let e = (-1.0f64).exp();
    assert_grad(&run, "x", &[1.0 / (1.0 + e), e / (1.0 + e), 0.0]);
}

#[test]
fn reduce_logsumexp_filtered() {
    // The softmax runs over the selected elements only.
    let src = "loss L() { input x: [N]  logsumexp(j | j != 0) x[j] }";
    let xs = [5.0, -1.0, 2.0, 1.0];
    let run = smooth(src, &json1("x", &xs));
    let z: f64 = xs[1..].iter().map(|x| x.exp()).sum();
    let mut want = vec![0.0];
    want.extend(xs[1..].iter().map(|x| x.exp() / z));
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_logsumexp_per_row_cross_entropy() {
    // mean(i) (logsumexp(j) x[i, j] - x[i, i]): (softmax - identity) / N.
    let src = "loss L() { input x: [N, N]  mean(i) (logsumexp(j) x[i, j] - x[i, i]) }";
    let x: [[f64; 3]; 3] = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5], [0.3, 0.2, 0.1]];
    let run = smooth(src, &format!(r#"{{"x": {x:?}}}"#));
    let mut want = Vec::new();
    for (i, row) in x.iter().enumerate() {
        let z: f64 = row.iter().map(|v| v.exp()).sum();
        for (j, v) in row.iter().enumerate() {
            want.push((v.exp() / z - if i == j { 1.0 } else { 0.0 }) / 3.0);
        }
    }
    assert_grad(&run, "x", &want);
}

#[test]
fn reduce_logsumexp_over_two_variables_filtered() {
    // CoSENT's shape: logsumexp over pairs (i, j) with labels[i] < labels[j].
    let src = "loss L() { input s: [N]  input labels: [N]
        softplus(logsumexp(i, j | labels[i] < labels[j]) (s[i] - s[j])) }";
    let json = r#"{"s": [0.5, -1.0, 2.0], "labels": [0.1, 0.9, 0.5]}"#;
    let run = smooth(src, json);
    // Pairs (0,1), (0,2), (2,1): terms s0-s1, s0-s2, s2-s1.
    let s: [f64; 3] = [0.5, -1.0, 2.0];
    let t: [f64; 3] = [s[0] - s[1], s[0] - s[2], s[2] - s[1]];
    let z: f64 = t.iter().map(|v| v.exp()).sum();
    let outer = sigmoid(z.ln());
    let p: Vec<f64> = t.iter().map(|v| v.exp() / z * outer).collect();
    assert_grad(&run, "s", &[p[0] + p[1], -p[0] - p[2], -p[1] + p[2]]);
    assert_grad(&run, "labels", &[0.0, 0.0, 0.0]);
}

#[test]
fn reduce_count_is_not_differentiated() {
    // A count in the loss is a constant; mean(i | x[i] > 0) depends on x only
    // through the selected values.
    let src =
        "loss L() { input x: [N]  mean(i | x[i] > 0.0) x[i] ^ 2 + float(count(i | x[i] > 1.0)) }";
    let run = smooth(src, &json1("x", &[0.5, -2.0, 3.0]));
    assert_grad(&run, "x", &[0.5, 0.0, 3.0]);
}

// --------------------------------------------------- empty filtered reductions

#[test]
fn empty_filtered_reductions_have_zero_gradient() {
    // Every reduction selects nothing (j > 10 on 3 elements); only x[0] counts.
    let src = "loss L() { input x: [N]
        x[0] + sum(j | j > 10) x[j] + mean(j | j > 10, else 1.0) x[j] ^ 2
             + max(j | j > 10, else 0) x[j] + min(j | j > 10, else 0) x[j]
             + logsumexp(j | j > 10, else 0) x[j] }";
    let run = smooth(src, &json1("x", &[0.5, -2.0, 3.0]));
    assert_loss(&run, 1.5);
    assert_exact(&run, "x", &[1.0, 0.0, 0.0]);
}

#[test]
fn empty_filtered_reductions_per_row() {
    // Row 1 has a label of its own: its same-label set without itself is empty.
    let d = r#"[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.5]]"#;
    let json = format!(r#"{{"d": {d}, "labels": [0, 1, 0]}}"#);
    let want = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
    for op in ["sum", "mean", "max", "min", "logsumexp"] {
        let src = format!(
            "loss L() {{ input d: [N, N]  input labels: int[N]
                sum(i) {op}(j | labels[j] == labels[i] and j != i, else 0) d[i, j] }}"
        );
        let run = smooth(&src, &json);
        assert_loss(&run, 10.0);
        assert_grad(&run, "d", &want);
    }
}

#[test]
fn empty_filtered_max_with_default_in_a_hinge() {
    // Batch-hard shape: hardest positive (empty for row 1) in a relu.
    let src = "loss L() { input d: [N, N]  input labels: int[N]
        let hp[i] = max(j | labels[j] == labels[i] and j != i, else 0) d[i, j]
        let hn[i] = min(j | labels[j] != labels[i], else 100) d[i, j]
        mean(i) relu(hp[i] - hn[i] + 2) }";
    let json = r#"{"d": [[0.0, 1.0, 3.0], [1.0, 0.0, 4.0], [3.0, 4.0, 0.0]], "labels": [0, 1, 0]}"#;
    let run = smooth(src, json);
    // Row 0: hp = d[0,2] = 3, hn = d[0,1] = 1. Row 1: hp = 0 (empty set, no
    // gradient), hn = d[1,0] = 1. Row 2: hp = d[2,0] = 3, hn = d[2,1] = 4.
    // Every hinge is active; each row weighs 1/3.
    let t = 1.0 / 3.0;
    assert_grad(&run, "d", &[0.0, -t, t, -t, 0.0, 0.0, t, -t, 0.0]);
}

// ------------------------------------------------------ reads and gathers

#[test]
fn read_diagonal_of_input() {
    let src = "loss L() { input s: [N, N]  sum(i) float(i + 1) * s[i, i] ^ 2 }";
    let run = smooth(
        src,
        r#"{"s": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]}"#,
    );
    assert_grad(&run, "s", &[2.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 54.0]);
}

#[test]
fn read_diagonal_of_computed_node() {
    // s = x x^T; sum(i) s[i, i] = ||x||_F^2: gradient 2x.
    let src =
        "loss L() { input x: [N, D]  let s[i, j] = sum(k) x[i, k] * x[j, k]  sum(i) s[i, i] }";
    let x = [0.5, -1.0, 2.0, 1.5, 0.25, -0.75];
    let run = smooth(src, r#"{"x": [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]}"#);
    let want: Vec<f64> = x.iter().map(|v| 2.0 * v).collect();
    assert_grad(&run, "x", &want);
}

#[test]
fn read_diagonal_in_in_batch_softmax() {
    // The MNRL shape on one input: s = 2 x x^T, mean(i) lse_j s[i, j] - s[i, i].
    // d/dx_m = (2/N) [sum_j P_mj x_j + sum_i P_im x_i - 2 x_m].
    let src = "loss L() { input x: [N, D]  let s[i, j] = 2.0 * sum(k) x[i, k] * x[j, k]
        mean(i) (logsumexp(j) s[i, j] - s[i, i]) }";
    let x: [[f64; 2]; 3] = [[0.5, -1.0], [1.5, 0.25], [-0.3, 0.8]];
    let run = smooth(src, &format!(r#"{{"x": {x:?}}}"#));
    let n = 3;
    let s = |i: usize, j: usize| 2.0 * (x[i][0] * x[j][0] + x[i][1] * x[j][1]);
    let p = |i: usize, j: usize| {
        let z: f64 = (0..n).map(|c| s(i, c).exp()).sum();
        s(i, j).exp() / z
    };
    let mut want = Vec::new();
    for m in 0..n {
        for k in 0..2 {
            let mut g = -2.0 * x[m][k];
            for j in 0..n {
                g += p(m, j) * x[j][k] + p(j, m) * x[j][k];
            }
            want.push(2.0 / n as f64 * g);
        }
    }
    assert_grad(&run, "x", &want);
}

#[test]
fn read_label_gather() {
    // logits[i, labels[i]]: a one-hot per row, weighted by the row.
    let src = "loss L() { input logits: [N, C]  input labels: int[N]
        sum(i) float(i + 1) * logits[i, labels[i]] }";
    let json =
        r#"{"logits": [[0.5, 1.0, 2.0], [1.0, 0.0, -0.5], [0.3, 0.2, 0.1]], "labels": [2, 0, 2]}"#;
    let run = smooth(src, json);
    assert_grad(
        &run,
        "logits",
        &[0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0],
    );
}

#[test]
fn read_label_gather_cross_entropy() {
    let src = "loss L() { input logits: [N, C]  input labels: int[N]
        mean(i) (logsumexp(c) logits[i, c] - logits[i, labels[i]]) }";
    let logits: [[f64; 3]; 2] = [[0.5, 1.0, 2.0], [1.0, 0.0, -0.5]];
    let labels = [1usize, 0];
    let json = format!(r#"{{"logits": {logits:?}, "labels": [1, 0]}}"#);
    let run = smooth(src, &json);
    let mut want = Vec::new();
    for (i, row) in logits.iter().enumerate() {
        let z: f64 = row.iter().map(|v| v.exp()).sum();
        for (c, v) in row.iter().enumerate() {
            want.push((v.exp() / z - if c == labels[i] { 1.0 } else { 0.0 }) / 2.0);
        }
    }
    assert_grad(&run, "logits", &want);
}

#[test]
fn read_label_gather_of_rows_accumulates() {
    // centres[labels[i], d]: rows sharing a label add up; an unused centre gets 0.
    let src = "loss L() { input x: [N, D]  input centres: [C, D]  input labels: int[N]
        sum(i, d) (x[i, d] - centres[labels[i], d]) ^ 2 }";
    let x: [[f64; 2]; 4] = [[0.5, 0.0], [2.0, 0.0], [1.0, 2.0], [0.0, 0.0]];
    let c: [[f64; 2]; 3] = [[0.0, 0.0], [1.0, 1.0], [2.0, -1.0]];
    let labels = [0usize, 2, 0, 0];
    let json = format!(r#"{{"x": {x:?}, "centres": {c:?}, "labels": [0, 2, 0, 0]}}"#);
    let run = smooth(src, &json);
    let mut gx = Vec::new();
    let mut gc = vec![0.0; 6];
    for i in 0..4 {
        for d in 0..2 {
            let r = x[i][d] - c[labels[i]][d];
            gx.push(2.0 * r);
            gc[labels[i] * 2 + d] -= 2.0 * r;
        }
    }
    assert_grad(&run, "x", &gx);
    assert_grad(&run, "centres", &gc);
    assert_eq!(&run.grad("centres")[2..4], &[0.0, 0.0]);
}

#[test]
fn read_modulo_index() {
    // x[c % 2] over c < 6: x0 is read at c = 0, 2, 4 and x1 at 1, 3, 5.
    let src = "loss L() { input x: [2]  sum(c: 6) float(c + 1) * x[c % 2] ^ 2 }";
    let run = smooth(src, &json1("x", &[0.5, -1.5]));
    assert_grad(&run, "x", &[9.0, -36.0]);
}

#[test]
fn read_shifted_index() {
    // d[i] = x[i + 1] - x[i]: a read at i + 1 is shifted back, with a range guard.
    let src = "loss L() { input x: [N]  let d[i: N - 1] = x[i + 1] - x[i]  sum(i) d[i] ^ 2 }";
    let run = smooth(src, &json1("x", &[1.0, 3.0, 2.0, 5.0]));
    assert_loss(&run, 14.0);
    assert_grad(&run, "x", &[-4.0, 6.0, -8.0, 6.0]);
}

#[test]
fn read_shifted_index_backwards() {
    // A reversed read x[N - 2 - i]: solved as a condition, not a renaming;
    // x[N - 2], .., x[0] get weights 1, .., N - 1 and x[N - 1] nothing.
    let src = "loss L() { input x: [N]  sum(i: N - 1) float(i + 1) * x[N - 2 - i] }";
    let run = smooth(src, &json1("x", &[1.0, 3.0, 2.0, 5.0]));
    assert_grad(&run, "x", &[3.0, 2.0, 1.0, 0.0]);
}

#[test]
fn slice_one_axis() {
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * x[1:][i] ^ 2 }";
    let run = smooth(src, &json1("x", &[1.0, 3.0, 2.0, 5.0]));
    assert_grad(&run, "x", &[0.0, 6.0, 8.0, 30.0]);
}

#[test]
fn slice_inner_axis() {
    let src = "loss L() { input x: [N, D]  sum(i, k) float(10 * i + k + 1) * x[:, 1:3][i, k] }";
    let run = smooth(
        src,
        r#"{"x": [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]}"#,
    );
    assert_grad(&run, "x", &[0.0, 1.0, 2.0, 0.0, 0.0, 11.0, 12.0, 0.0]);
}

#[test]
fn slice_to_end_and_from_symbolic_start() {
    // Slices with a symbolic start (a[1, D - 1:]) and an open start (a[0, :2]).
    let src = "loss L() { input a: [B, D]  sum(k) a[1, D - 1:][k] ^ 2 + sum(k) 3.0 * a[0, :2][k] }";
    let run = smooth(src, r#"{"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}"#);
    assert_grad(&run, "a", &[3.0, 3.0, 0.0, 0.0, 0.0, 12.0]);
}

// ------------------------------------------------------------------ layout

const AB: &str = r#"{"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "b": [[7.0, 8.0, 9.0]]}"#;

#[test]
fn layout_concat_rows() {
    let src = "loss L() { input a: [B, D]  input b: [C, D]  let r = concat(a, b)
        sum(i, k) float(10 * i + k + 1) * r[i, k] ^ 2 }";
    let run = smooth(src, AB);
    let w = |i: usize, k: usize| (10 * i + k + 1) as f64;
    let a: Vec<f64> = (0..6)
        .map(|j| 2.0 * w(j / 3, j % 3) * (j + 1) as f64)
        .collect();
    let b: Vec<f64> = (0..3).map(|k| 2.0 * w(2, k) * (7 + k) as f64).collect();
    assert_grad(&run, "a", &a);
    assert_grad(&run, "b", &b);
}

#[test]
fn layout_concat_columns() {
    // concat(a, a, axis=1): each element is read twice, at k and k + D.
    let src = "loss L() { input a: [B, D]  let c = concat(a, a, axis=1)
        sum(i, k) float(k + 1) * c[i, k] }";
    let run = smooth(src, r#"{"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}"#);
    assert_grad(&run, "a", &[5.0, 7.0, 9.0, 5.0, 7.0, 9.0]);
}

#[test]
fn layout_flatten_of_stack() {
    // flat = [a; 10 a]: row r < B is a[r], row B + r is 10 a[r].
    let src = "loss L() { input a: [B, D]  let flat = flatten(stack(a, a * 10))
        sum(r, k) float(r + 1) * flat[r, k] }";
    let run = smooth(src, r#"{"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}"#);
    // a[0]: 1 + 10 * 3; a[1]: 2 + 10 * 4.
    assert_grad(&run, "a", &[31.0, 31.0, 31.0, 42.0, 42.0, 42.0]);
}

#[test]
fn layout_flatten_of_input() {
    let src = "loss L() { input n: [K, B, D]  let f = flatten(n)
        sum(r, k) float(r + 1) * f[r, k] ^ 2 }";
    let run = smooth(src, r#"{"n": [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]}"#);
    assert_grad(&run, "n", &[2.0, 4.0, 12.0, 16.0, 30.0, 36.0]);
}

#[test]
fn layout_stack() {
    let src = "loss L() { input a: [B, D]  input b: [B, D]
        sum(s, i, k) float(s + 1) * stack(a, b)[s, i, k] ^ 2 }";
    let run = smooth(
        src,
        r#"{"a": [[1.0, 2.0], [3.0, 4.0]], "b": [[-1.0, 0.5], [2.0, 0.0]]}"#,
    );
    assert_grad(&run, "a", &[2.0, 4.0, 6.0, 8.0]);
    assert_grad(&run, "b", &[-4.0, 2.0, 8.0, 0.0]);
}

#[test]
fn layout_transpose() {
    let src = "loss L() { input a: [B, D]  let t = transpose(a)
        sum(k, i) float(k * 10 + i) * t[k, i] }";
    let run = smooth(src, r#"{"a": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}"#);
    assert_grad(&run, "a", &[0.0, 10.0, 20.0, 1.0, 11.0, 21.0]);
}

#[test]
fn layout_program_all_constructs() {
    // tests/programs/ok/layout.loss's loss, on its inputs: FD only.
    let src = "loss L() { input a: [B, D]  input b: [C, D]
        let rows = concat(a, b)
        let flat = flatten(stack(a, a * 10))
        let t = transpose(a)
        sum(i, k) rows[i, k] * rows[i, k] * float(i - k) + sum(r, k) flat[r, k] ^ 2 * float(r + 1)
            + sum(k, i) exp(t[k, i] / 5.0) * float(k * 10 + i) + sum(i, k) a[:, 1:][i, k] ^ 3 }";
    smooth(src, AB);
}

// ---------------------------------------------------------------- variadic

const VARIADIC: &str = "loss V(scale: float = 2.0) {
    input anchor: [B, D]
    input positive: [B, D]
    input negative: [K, B, D] = []
    let docs = concat(positive, flatten(negative))
    let s[i, c] = scale * dot(anchor[i], docs[c])
    mean(i) (logsumexp(c) s[i, c] - s[i, i])
}";

/// The in-batch softmax's gradients by hand: with P the row softmax of
/// s = 2 A Dᵀ, dA = (2/B) (P D - D[:B]), dD = (2/B) (Pᵀ A - [c < B] A[c]).
fn variadic_reference(a: &[[f64; 2]], docs: &[[f64; 2]]) -> (Vec<f64>, Vec<f64>) {
    let b = a.len();
    let s = |i: usize, c: usize| 2.0 * (a[i][0] * docs[c][0] + a[i][1] * docs[c][1]);
    let p = |i: usize, c: usize| {
        let z: f64 = (0..docs.len()).map(|j| s(i, j).exp()).sum();
        s(i, c).exp() / z
    };
    let k = 2.0 / b as f64;
    let mut ga = Vec::new();
    for i in 0..b {
        for d in 0..2 {
            let mut g = -docs[i][d];
            for c in 0..docs.len() {
                g += p(i, c) * docs[c][d];
            }
            ga.push(k * g);
        }
    }
    let mut gd = Vec::new();
    for c in 0..docs.len() {
        for d in 0..2 {
            let mut g = if c < b { -a[c][d] } else { 0.0 };
            for i in 0..b {
                g += p(i, c) * a[i][d];
            }
            gd.push(k * g);
        }
    }
    (ga, gd)
}

#[test]
fn variadic_zero_columns() {
    let a = [[1.0, 0.0], [0.0, 1.0]];
    let p = [[0.5, 0.5], [1.0, -1.0]];
    let json = format!(r#"{{"anchor": {a:?}, "positive": {p:?}}}"#);
    let run = smooth(VARIADIC, &json);
    assert_eq!(
        run.grads.keys().collect::<Vec<_>>(),
        ["anchor", "positive"],
        "no columns: no negative gradients"
    );
    let (ga, gd) = variadic_reference(&a, &p);
    assert_grad(&run, "anchor", &ga);
    assert_grad(&run, "positive", &gd);
}

#[test]
fn variadic_three_columns() {
    let a = [[1.0, 0.0], [0.0, 1.0]];
    let p = [[0.5, 0.5], [1.0, -1.0]];
    let n = [
        [[0.0, 2.0], [1.0, 1.0]],
        [[-1.0, 0.0], [0.5, 0.0]],
        [[0.0, 0.0], [2.0, -0.5]],
    ];
    let json = format!(
        r#"{{"anchor": {a:?}, "positive": {p:?}, "negative_1": {:?}, "negative_2": {:?}, "negative_3": {:?}}}"#,
        n[0], n[1], n[2]
    );
    let run = smooth(VARIADIC, &json);
    assert_loss(&run, 4.782852062823897);
    let mut docs = p.to_vec();
    for col in &n {
        docs.extend(col.iter().copied());
    }
    let (ga, gd) = variadic_reference(&a, &docs);
    assert_grad(&run, "anchor", &ga);
    assert_grad(&run, "positive", &gd[..4]);
    assert_grad(&run, "negative_1", &gd[4..8]);
    assert_grad(&run, "negative_2", &gd[8..12]);
    assert_grad(&run, "negative_3", &gd[12..]);
}

#[test]
fn variadic_three_columns_stacked() {
    // The same columns given as one stacked [K, B, D] tensor: one gradient.
    let json = r#"{"anchor": [[1.0, 0.0], [0.0, 1.0]], "positive": [[0.5, 0.5], [1.0, -1.0]],
        "negative": [[[0.0, 2.0], [1.0, 1.0]], [[-1.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [2.0, -0.5]]]}"#;
    let run = smooth(VARIADIC, json);
    assert_eq!(run.grad("negative").len(), 12);
}

// -------------------------------------------------------- if-then-else masks

#[test]
fn select_on_value() {
    let src = "loss L() { input x: [N]  sum(i) if x[i] > 0.0 then x[i] ^ 2 else 3.0 * x[i] }";
    let run = smooth(src, &json1("x", &[1.5, -2.0, 0.5, -0.1]));
    assert_grad(&run, "x", &[3.0, 3.0, 1.0, 3.0]);
}

#[test]
fn select_on_bool_mask() {
    let src = "loss L() { input x: [N]  input y: [N]  input m: bool[N]
        sum(i) if m[i] then x[i] * y[i] else y[i] ^ 2 }";
    let json = r#"{"x": [1.0, 2.0, 3.0], "y": [-1.0, 0.5, 2.0], "m": [true, false, true]}"#;
    let run = smooth(src, json);
    assert_grad(&run, "x", &[-1.0, 0.0, 2.0]);
    assert_grad(&run, "y", &[1.0, 1.0, 3.0]);
}

#[test]
fn select_of_whole_tensors() {
    // (if x[i] > 0 then x else -x)[i] = |x_i|.
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * (if x[i] > 0.0 then x else -x)[i] }";
    let run = smooth(src, &json1("x", &[1.5, -2.0, 0.5]));
    assert_grad(&run, "x", &[1.0, -2.0, 3.0]);
}

#[test]
fn select_mask_from_labels_and_indices() {
    // An equality mask on labels and an index condition, both branches live.
    let src = "loss L() { input d: [N, N]  input labels: int[N]
        sum(i, j) if labels[i] == labels[j] and i != j then d[i, j] ^ 2 else relu(2.0 - d[i, j]) }";
    let json = r#"{"d": [[0.5, 1.0, 3.0], [1.0, 0.2, 4.0], [1.5, 2.5, 0.7]], "labels": [0, 1, 0]}"#;
    let run = smooth(src, json);
    assert_grad(
        &run,
        "d",
        &[-1.0, -1.0, 6.0, -1.0, -1.0, 0.0, 3.0, 0.0, -1.0],
    );
}

// ------------------------------------------------------------------ detach

#[test]
fn detach_in_the_middle_of_an_expression() {
    // sum x * detach(x y) + y * detach(x): dx = x y, dy = x.
    let src = "loss L() { input x: [N]  input y: [N]
        sum(i) (x[i] * detach(x[i] * y[i]) + y[i] * detach(x[i])) }";
    let json = r#"{"x": [1.0, -2.0, 0.5], "y": [3.0, 0.25, -1.0]}"#;
    let run = symbolic(src, json);
    assert_grad(&run, "x", &[3.0, -0.5, -0.5]);
    assert_grad(&run, "y", &[1.0, -2.0, 0.5]);
    let report = gradcheck_passes(src, json);
    assert!(
        report.frozen_detach,
        "detach: gradcheck freezes the detached terms"
    );
}

#[test]
fn detach_straight_through() {
    // x + detach(f(x) - x) has the value f(x) and the gradient of x.
    let src = "loss L() { input x: [N]  sum(i) float(i + 1) * (x[i] + detach(exp(x[i]) - x[i])) }";
    let xs = [0.5, -1.0, 2.0];
    let run = symbolic(src, &json1("x", &xs));
    assert_loss(
        &run,
        xs.iter().zip(weights(3)).map(|(x, w)| w * x.exp()).sum(),
    );
    assert_grad(&run, "x", &[1.0, 2.0, 3.0]);
    gradcheck_passes(src, &json1("x", &xs));
}

#[test]
fn detach_inside_a_reduction_body() {
    // Softmax weights held constant: sum(j) detach(softmax_j) x_j.
    let src = "loss L() { input x: [N]  let z = logsumexp(j) x[j]
        sum(j) detach(exp(x[j] - z)) * x[j] ^ 2 }";
    let xs: [f64; 3] = [0.5, -1.0, 2.0];
    let run = symbolic(src, &json1("x", &xs));
    let zsum: f64 = xs.iter().map(|x| x.exp()).sum();
    let want: Vec<f64> = xs.iter().map(|x| x.exp() / zsum * 2.0 * x).collect();
    assert_grad(&run, "x", &want);
    gradcheck_passes(src, &json1("x", &xs));
}

// ------------------------------------------------------------ more reads

#[test]
fn read_same_node_at_two_shifted_positions() {
    // x[i + 1] * x[i]: two reads of one node at different positions, two
    // contributions: d/dx_j = x_{j-1} + x_{j+1} where they exist.
    let src = "loss L() { input x: [N]  sum(i: N - 1) x[i + 1] * x[i] }";
    let run = smooth(src, &json1("x", &[1.0, 2.0, 3.0, 4.0]));
    assert_grad(&run, "x", &[2.0, 4.0, 6.0, 3.0]);
}

#[test]
fn read_transposed() {
    // A comprehension over (i, j) reading x[j, i].
    let src = "loss L() { input x: [N, M]  sum(i, j) float(i + 2 * j) * x[j, i] ^ 2 }";
    let run = smooth(src, r#"{"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]}"#);
    // x[r, c] is read at i = c, j = r: weight c + 2 r.
    assert_grad(&run, "x", &[0.0, 4.0, 12.0, 24.0, 40.0, 60.0]);
}

#[test]
fn read_at_symbolic_constant_index() {
    let src = "loss L() { input x: [N]  x[N - 1] ^ 2 + 3.0 * x[0] }";
    let run = smooth(src, &json1("x", &[1.0, 2.0, 3.0]));
    assert_grad(&run, "x", &[3.0, 0.0, 6.0]);
}

#[test]
fn detach_of_a_node_also_read_without_detach() {
    // w = exp(x) read twice, once detached: d/dx detach(w) w = w * w.
    let src = "loss L() { input x: [N]  let w[i] = exp(x[i])  sum(i) detach(w[i]) * w[i] }";
    let xs: [f64; 2] = [0.1, 0.2];
    let run = symbolic(src, &json1("x", &xs));
    let want: Vec<f64> = xs.iter().map(|x| (2.0 * x).exp()).collect();
    assert_grad(&run, "x", &want);
    gradcheck_passes(src, &json1("x", &xs));
}

#[test]
fn reduce_max_filtered_tie_with_an_excluded_element() {
    // x[0] equals the maximum but is filtered out: the gradient goes to x[2].
    let src = "loss L() { input x: [N]  max(j | j != 0) x[j] }";
    let run = symbolic(src, &json1("x", &[3.0, 1.0, 3.0]));
    assert_exact(&run, "x", &[0.0, 0.0, 1.0]);
}

#[test]
fn reduce_max_read_by_a_let_with_ties() {
    // m = max(x) (tie at 1, 2) used in two places: d/dm = sum -2(x - m) + 1 = 5,
    // all to x[1].
    let src = "loss L() { input x: [N]  let m = max(j) x[j]  sum(i) (x[i] - m) ^ 2 + m }";
    let run = symbolic(src, &json1("x", &[1.0, 3.0, 3.0]));
    assert_exact(&run, "x", &[-4.0, 5.0, 0.0]);
}

#[test]
fn reduce_max_of_expression_f32_finds_its_element() {
    // The selected element is found by comparing the recomputed body with the
    // stored maximum: in f32 too the comparison must hit.
    let src = "loss L() { input x: [N]  max(j) (exp(x[j]) * 1.7 / 3.1 - x[j] * 0.1) }";
    let graph = compile(src);
    let (_, grads) = grads_of::<f32>(&graph, &tensors_of(&json1("x", &[0.3, 1.1, 0.7]))).unwrap();
    let g = &grads[0].2;
    let want = 1.1f64.exp() * 1.7 / 3.1 - 0.1;
    assert_eq!((g[0], g[2]), (0.0, 0.0), "{g:?}");
    assert!((g[1] - want).abs() < 1e-5, "{g:?}");
}

// ------------------------------------------------- pow at a zero base: bugs

#[test]
fn pow_live_exponent_at_zero_base() {
    // torch.pow's exponent gradient is masked to 0 where base == 0 and
    // exponent >= 0; lossc gives NaN (0 * log 0) and -inf (1 * log 0).
    let src = "loss L() { input x: [N]  input y: [N]  sum(i) x[i] ^ y[i] }";
    let run = symbolic(src, r#"{"x": [0.0, 0.0, 2.0], "y": [2.0, 0.0, 1.0]}"#);
    assert_exact(&run, "y", &[0.0, 0.0, 2.0 * 2f64.ln()]);
}

#[test]
fn pow_zero_exponent_at_zero_base() {
    // torch.pow's base gradient is masked to 0 where exponent == 0; lossc
    // computes 0 * 0^(-1) = NaN.
    let src = "loss L() { input x: [N]  input y: [N]  sum(i) x[i] ^ y[i] }";
    let run = symbolic(src, r#"{"x": [0.0, 0.0, 2.0], "y": [2.0, 0.0, 1.0]}"#);
    assert_exact(&run, "x", &[0.0, 0.0, 1.0]);
}

#[test]
fn pow_constant_zero_base() {
    let src = "loss L() { input x: [N]  sum(i) 0.0 ^ x[i] }";
    let run = symbolic(src, &json1("x", &[0.0, 1.0]));
    assert_exact(&run, "x", &[0.0, 0.0]);
}
