//! Snapshots of the optimised forward-plus-gradient program
//! (`lossc::differentiate`) of every standard loss with its default
//! parameters and of the variants whose gradients differ most. A change to
//! `grad`, `opt` or a standard loss that changes a gradient program shows up
//! here as a reviewable diff.
//!
//! Update after an intended change with `INSTA_UPDATE=always cargo test --test
//! snapshots_grad` (or `cargo insta review`), then read every changed `.snap`:
//! each `grad` line must name a node, every float input must have one, and
//! max/min/logsumexp adjoints must read the selected index / softmax weights.
//!
//! The number of hard-negative columns K is a symbolic dim, so MNRL's program
//! with one hard-negative column is `mnrl_default`.

mod common;
use common::{compile_std, params_of};

/// (snapshot name, loss class, parameters as JSON).
const VARIANTS: &[(&str, &str, &str)] = &[
    ("cosine_similarity_default", "CosineSimilarityLoss", "{}"),
    ("mnrl_default", "MultipleNegativesRankingLoss", "{}"),
    ("triplet_default", "TripletLoss", "{}"),
    ("cosent_default", "CoSENTLoss", "{}"),
    ("contrastive_default", "ContrastiveLoss", "{}"),
    (
        "triplet_cosine",
        "TripletLoss",
        r#"{"distance_metric": "cosine"}"#,
    ),
    (
        "contrastive_euclidean",
        "ContrastiveLoss",
        r#"{"distance_metric": "euclidean"}"#,
    ),
    (
        "mnrl_all_directions_joint",
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}"#,
    ),
];

fn grad_program(class: &str, params: &str) -> String {
    let graph = compile_std(class, &params_of(params)).unwrap_or_else(|e| panic!("{e}"));
    let (full, _) = lossc::differentiate(&graph);
    lossc::ir::verify::verify(&full).unwrap_or_else(|e| panic!("{class}: verifier: {e}"));
    // Every float input has a gradient.
    for (_, node, name, _) in full.inputs() {
        if node.dtype == lossc::ir::DType::Float {
            assert!(
                full.grads.iter().any(|(n, _)| n == name),
                "{class} {params}: no gradient for `{name}`"
            );
        }
    }
    lossc::ir::print::print_graph(&full)
}

#[test]
fn gradient_programs() {
    for (name, class, params) in VARIANTS {
        let text = grad_program(class, params);
        insta::with_settings!({ description => format!("{class} {params}"), omit_expression => true }, {
            insta::assert_snapshot!(*name, text);
        });
    }
}

#[test]
fn mnrl_program_does_not_depend_on_negative_columns() {
    // K is symbolic: one program serves 0, 1 or 3 hard-negative columns.
    let text = grad_program("MultipleNegativesRankingLoss", "{}");
    assert!(text.contains("input ..negative"), "{text}");
    assert!(text.contains("grad negative = "), "{text}");
}
