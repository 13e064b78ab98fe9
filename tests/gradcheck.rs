//! `lossc::gradcheck::check` on the standard losses: every loss with its
//! default parameters on random inputs for three seeds, and every parameter
//! variant that changes the gradient program (distance metrics, loss
//! functions, similarity functions, score directions, partition modes, hard
//! negative columns, the detached hardness penalty). Plus the checker's own
//! behaviour: a hinge exactly at zero is a kink, not an error; detached terms
//! are frozen; a wrong gradient is caught.

mod common;
use common::*;
use lossc::gradcheck::{self, Options, Report};
use lossc::ir::{self, Comp, DType, Expr, Graph, Node, NodeKind, UnOp};
use std::collections::BTreeMap;

/// Worst relative error allowed between the symbolic and numerical derivative.
const TOL: f64 = 1e-5;
const SEEDS: [u64; 3] = [0, 1, 2];

fn run_check(
    graph: &Graph,
    full: &Graph,
    tensors: &lossc::tensor_io::TensorMap,
    seed: u64,
) -> Report {
    gradcheck::check(
        graph,
        full,
        tensors,
        &Options {
            seed,
            ..Default::default()
        },
    )
    .unwrap_or_else(|d| panic!("gradcheck did not run: {d:?}"))
}

/// Gradchecks a standard loss on random inputs (`dims` override B = 8,
/// D = 16, K = 1).
fn check_std(class: &str, params: &str, seed: u64, dims: &[(&str, i64)]) -> Report {
    let graph = compile_std(class, &params_of(params)).unwrap_or_else(|e| panic!("{e}"));
    let dims: BTreeMap<String, i64> = dims.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let tensors = lossc::bind::random_inputs(&graph, seed, &dims).unwrap();
    let (full, _) = lossc::differentiate(&graph);
    run_check(&graph, &full, &tensors, seed)
}

#[track_caller]
fn assert_passes(report: &Report, what: &str) {
    assert!(!report.inputs.is_empty(), "{what}: nothing was checked");
    assert!(report.loss.is_finite(), "{what}: loss {}", report.loss);
    for r in &report.inputs {
        assert!(
            r.worst <= TOL && r.kinks == 0 && r.checks > 0,
            "{what}: `{}` worst relative error {:e} over {} checks, {} kinks",
            r.name,
            r.worst,
            r.checks,
            r.kinks
        );
    }
}

fn names(report: &Report) -> Vec<&str> {
    report.inputs.iter().map(|r| r.name.as_str()).collect()
}

/// Passes for each seed; returns the reports.
fn passes_for_seeds(class: &str, params: &str, dims: &[(&str, i64)]) -> Vec<Report> {
    SEEDS
        .iter()
        .map(|&seed| {
            let report = check_std(class, params, seed, dims);
            assert_passes(&report, &format!("{class} {params} {dims:?} seed {seed}"));
            // Only hardness uses a stop-gradient in its math; several MNRL
            // directions detach the shift of their logsumexp, which changes no
            // gradient (its derivative is 1 - sum(softmax) = 0).
            assert!(
                !report.frozen_detach || params.contains("directions"),
                "{class} {params}: no detach expected"
            );
            report
        })
        .collect()
}

/// Variants run on smaller inputs than the defaults (B = 8, D = 16): every
/// coordinate is still checked, at a quarter of the cost.
const SMALL: [(&str, i64); 2] = [("B", 5), ("D", 8)];

fn small_and(extra: (&str, i64)) -> [(&str, i64); 3] {
    [SMALL[0], SMALL[1], extra]
}

// ------------------------------------------------------------- defaults

#[test]
fn cosine_similarity_default() {
    passes_for_seeds("CosineSimilarityLoss", "{}", &[]);
}

#[test]
fn mnrl_default() {
    let reports = passes_for_seeds("MultipleNegativesRankingLoss", "{}", &[]);
    assert_eq!(names(&reports[0]), ["anchor", "positive", "negative"]);
}

#[test]
fn triplet_default() {
    passes_for_seeds("TripletLoss", "{}", &[]);
}

#[test]
fn cosent_default() {
    passes_for_seeds("CoSENTLoss", "{}", &[]);
}

#[test]
fn contrastive_default() {
    passes_for_seeds("ContrastiveLoss", "{}", &[]);
}

// ------------------------------------------------------------- variants

#[test]
fn triplet_metrics() {
    for metric in ["euclidean", "cosine", "manhattan"] {
        passes_for_seeds(
            "TripletLoss",
            &format!(r#"{{"distance_metric": "{metric}"}}"#),
            &SMALL,
        );
    }
}

#[test]
fn triplet_small_margin_mixes_active_and_inactive_hinges() {
    // With margin 0.5 some rows' hinges are off: their gradient is zero.
    passes_for_seeds("TripletLoss", r#"{"triplet_margin": 0.5}"#, &SMALL);
}

#[test]
fn contrastive_metrics() {
    for metric in ["euclidean", "manhattan", "cosine_distance"] {
        passes_for_seeds(
            "ContrastiveLoss",
            &format!(r#"{{"distance_metric": "{metric}"}}"#),
            &SMALL,
        );
    }
}

#[test]
fn contrastive_sum() {
    passes_for_seeds("ContrastiveLoss", r#"{"size_average": false}"#, &SMALL);
    passes_for_seeds(
        "ContrastiveLoss",
        r#"{"size_average": false, "margin": 2.5, "distance_metric": "euclidean"}"#,
        &SMALL,
    );
}

#[test]
fn cosine_similarity_l1_and_sigmoid() {
    for params in [
        r#"{"loss_fct": "l1"}"#,
        r#"{"cos_score_transformation": "sigmoid"}"#,
        r#"{"loss_fct": "l1", "cos_score_transformation": "sigmoid"}"#,
    ] {
        passes_for_seeds("CosineSimilarityLoss", params, &SMALL);
    }
}

#[test]
fn cosent_dot() {
    passes_for_seeds(
        "CoSENTLoss",
        r#"{"similarity_fct": "pairwise_dot_score"}"#,
        &SMALL,
    );
}

#[test]
fn mnrl_dot_score() {
    // dot scores of random normals are large; scale 1 keeps the softmax unsaturated.
    passes_for_seeds(
        "MultipleNegativesRankingLoss",
        r#"{"similarity_fct": "dot_score", "scale": 1.0}"#,
        &SMALL,
    );
    passes_for_seeds(
        "MultipleNegativesRankingLoss",
        r#"{"similarity_fct": "dot_score"}"#,
        &SMALL,
    );
}

#[test]
fn mnrl_all_directions_joint() {
    passes_for_seeds(
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}"#,
        &SMALL,
    );
}

#[test]
fn mnrl_per_direction() {
    passes_for_seeds(
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "doc_to_query"], "partition_mode": "per_direction"}"#,
        &SMALL,
    );
}

#[test]
fn mnrl_zero_negative_columns() {
    let reports = passes_for_seeds("MultipleNegativesRankingLoss", "{}", &small_and(("K", 0)));
    // An empty input has nothing to check.
    assert_eq!(names(&reports[0]), ["anchor", "positive"]);
}

#[test]
fn mnrl_three_negative_columns() {
    let reports = passes_for_seeds("MultipleNegativesRankingLoss", "{}", &small_and(("K", 3)));
    assert_eq!(names(&reports[0]), ["anchor", "positive", "negative"]);
    passes_for_seeds(
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}"#,
        &small_and(("K", 3)),
    );
}

// ------------------------------------------------------------------ detach

#[test]
fn mnrl_in_batch_hardness_passes_with_frozen_detach() {
    for mode in ["in_batch_negatives", "hard_negatives", "all_negatives"] {
        let params = format!(r#"{{"hardness_mode": "{mode}", "hardness_strength": 2.0}}"#);
        for seed in SEEDS {
            let report = check_std("MultipleNegativesRankingLoss", &params, seed, &SMALL);
            assert!(report.frozen_detach, "{mode}: the penalty is detached");
            assert_passes(&report, &format!("MNRL {mode} seed {seed}"));
        }
    }
}

/// A copy of `g` with every `detach(e)` replaced by `e`.
fn strip_detach(g: &Graph) -> Graph {
    let mut out = g.clone();
    for node in &mut out.nodes {
        if let NodeKind::Comp(c) = &mut node.kind {
            c.body = c.body.map(&mut |e| match e {
                Expr::Unary(UnOp::Detach, inner) => *inner,
                other => other,
            });
        }
    }
    out
}

#[test]
fn detach_without_freezing_is_an_error() {
    // Checked against an objective with the detach removed, the symbolic
    // gradient (which stops at detach) must disagree with finite differences:
    // the checker is not blind to a wrong gradient.
    let params = params_of(r#"{"hardness_mode": "in_batch_negatives", "hardness_strength": 2.0}"#);
    let graph = compile_std("MultipleNegativesRankingLoss", &params).unwrap();
    let dims: BTreeMap<String, i64> = SMALL.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let tensors = lossc::bind::random_inputs(&graph, 0, &dims).unwrap();
    let (full, _) = lossc::differentiate(&graph);
    let stripped = strip_detach(&graph);
    let report = run_check(&stripped, &full, &tensors, 0);
    assert!(!report.frozen_detach);
    let worst = report.inputs.iter().map(|r| r.worst).fold(0.0, f64::max);
    assert!(worst > 1e-2, "expected a mismatch, worst {worst:e}");
    // ... and the same gradient passes once the detached terms are frozen.
    assert_passes(&run_check(&graph, &full, &tensors, 0), "frozen");
}

#[test]
fn detach_small_program_frozen() {
    let src = "loss L() { input x: [N]  sum(i) x[i] * detach(x[i]) }";
    let graph = compile_src(src, None, &params_of("{}")).unwrap();
    let tensors = tensors_of(r#"{"x": [0.5, -1.0, 2.0]}"#);
    let (full, _) = lossc::differentiate(&graph);
    let report = run_check(&graph, &full, &tensors, 0);
    assert!(report.frozen_detach);
    assert_passes(&report, "x * detach(x)");
    let report = run_check(&strip_detach(&graph), &full, &tensors, 0);
    // d/dx x^2 = 2x, but the symbolic gradient is x: off by half.
    assert!((report.inputs[0].worst - 0.5).abs() < 1e-6, "{report:?}");
}

// ------------------------------------------------------------------- kinks

fn check_src(src: &str, json: &str) -> Report {
    let graph = compile_src(src, None, &params_of("{}")).unwrap_or_else(|e| panic!("{e}"));
    let tensors = tensors_of(json);
    let (full, _) = lossc::differentiate(&graph);
    run_check(&graph, &full, &tensors, 0)
}

#[test]
fn hinge_at_zero_is_a_kink_not_an_error() {
    let report = check_src(
        "loss L() { input x: [N]  relu(x[0] - x[1]) }",
        r#"{"x": [1.0, 1.0, 0.5]}"#,
    );
    let x = &report.inputs[0];
    assert!(x.kinks > 0, "{report:?}");
    assert!(x.worst <= TOL, "{report:?}");
    // Directions along x[2] alone see no kink and are compared.
    assert!(x.checks > 0, "{report:?}");
}

#[test]
fn other_kinks_are_kinks() {
    for (src, json) in [
        (
            "loss L() { input x: [N]  sum(i) abs(x[i]) }",
            r#"{"x": [0.0, 1.0]}"#,
        ),
        (
            "loss L() { input x: [N]  max(j) x[j] }",
            r#"{"x": [1.0, 3.0, 3.0]}"#,
        ),
        (
            "loss L() { input x: [N]  input y: [N]  sum(i) maximum(x[i], y[i]) }",
            r#"{"x": [1.0, 2.0], "y": [1.0, 0.0]}"#,
        ),
        (
            "loss L() { input a: [D]  input b: [D]  sqrt(sum(k) (a[k] - b[k]) * (a[k] - b[k])) }",
            r#"{"a": [1.0, 2.0], "b": [1.0, 2.0]}"#,
        ),
    ] {
        let report = check_src(src, json);
        assert!(
            report.inputs.iter().any(|r| r.kinks > 0),
            "{src}: no kink reported: {report:?}"
        );
        for r in &report.inputs {
            assert!(r.worst <= TOL, "{src}: {report:?}");
        }
    }
}

#[test]
fn triplet_hinge_at_zero_is_a_kink() {
    // Row 0: relu(0 - 5 + 5) sits exactly on the hinge.
    let graph = compile_std("TripletLoss", &params_of("{}")).unwrap();
    let tensors = tensors_of(
        r#"{"anchor": [[1.0, 2.0], [0.0, 1.0]],
            "positive": [[1.0, 2.0], [1.0, 1.0]],
            "negative": [[4.0, 6.0], [0.0, -1.0]]}"#,
    );
    let (full, _) = lossc::differentiate(&graph);
    let report = run_check(&graph, &full, &tensors, 0);
    assert!(report.inputs.iter().any(|r| r.kinks > 0), "{report:?}");
    for r in &report.inputs {
        assert!(r.worst <= TOL, "{report:?}");
    }
}

// --------------------------------------------------------- wrong gradients

/// `full` with the gradient of `input` replaced by `f(old gradient)`.
fn doctor(full: &Graph, input: &str, f: impl Fn(Expr, &[Expr]) -> Expr) -> Graph {
    let mut g = full.clone();
    let pos = g.grads.iter().position(|(n, _)| n == input).unwrap();
    let old = g.grads[pos].1;
    let shape = g.node(old).shape.clone();
    let idx: Vec<ir::IdxVar> = shape.iter().map(|_| g.new_index("p")).collect();
    let at: Vec<Expr> = idx.iter().map(|v| Expr::Index(*v)).collect();
    let body = f(Expr::read(old, at.clone()), &at);
    let id = g.push(Node {
        kind: NodeKind::Comp(Comp {
            indices: idx,
            reduce: None,
            body,
        }),
        dtype: DType::Float,
        shape,
        name: None,
        span: None,
    });
    g.grads[pos].1 = id;
    ir::verify::verify(&g).unwrap();
    g
}

#[test]
fn wrong_gradient_is_reported() {
    let graph = compile_std("CosineSimilarityLoss", &params_of("{}")).unwrap();
    let tensors = lossc::bind::random_inputs(&graph, 0, &BTreeMap::new()).unwrap();
    let (full, _) = lossc::differentiate(&graph);
    assert_passes(&run_check(&graph, &full, &tensors, 0), "untouched");

    // Twice the gradient of sentence1.
    let doubled = doctor(&full, "sentence1", |g, _| {
        Expr::binary(ir::BinOp::Mul, Expr::Float(2.0), g)
    });
    let report = run_check(&graph, &doubled, &tensors, 0);
    let s1 = report
        .inputs
        .iter()
        .find(|r| r.name == "sentence1")
        .unwrap();
    assert!((s1.worst - 0.5).abs() < 1e-3, "{report:?}");
    let s2 = report
        .inputs
        .iter()
        .find(|r| r.name == "sentence2")
        .unwrap();
    assert!(s2.worst <= TOL, "{report:?}");

    // One coordinate zeroed: caught by the coordinate-wise checks.
    let holed = doctor(&full, "sentence2", |g, at| {
        let hit = Expr::binary(
            ir::BinOp::And,
            Expr::binary(ir::BinOp::Eq, at[0].clone(), Expr::Int(3)),
            Expr::binary(ir::BinOp::Eq, at[1].clone(), Expr::Int(5)),
        );
        Expr::Select(Box::new(hit), Box::new(Expr::Float(0.0)), Box::new(g))
    });
    let report = run_check(&graph, &holed, &tensors, 0);
    let s2 = report
        .inputs
        .iter()
        .find(|r| r.name == "sentence2")
        .unwrap();
    assert!(s2.worst > 0.1, "{report:?}");
}
