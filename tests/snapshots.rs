//! Snapshots of the printed graph IR of every standard loss: with default
//! parameters and with the parameter variants that change the graph (each
//! distance metric, loss function, similarity function, score direction and
//! hardness mode). A change to the elaborator or the standard library that
//! changes a graph shows up here as a reviewable diff.
//!
//! Update after an intended change with `INSTA_UPDATE=always cargo test --test
//! snapshots` (or `cargo insta review`), then read every changed `.snap`
//! against its `.loss` source before committing it.

mod common;
use common::compile_std;

/// (snapshot name, loss class, parameters as JSON).
const VARIANTS: &[(&str, &str, &str)] = &[
    // Defaults.
    ("cosine_similarity_default", "CosineSimilarityLoss", "{}"),
    ("mnrl_default", "MultipleNegativesRankingLoss", "{}"),
    ("triplet_default", "TripletLoss", "{}"),
    ("cosent_default", "CoSENTLoss", "{}"),
    ("contrastive_default", "ContrastiveLoss", "{}"),
    // TripletLoss distance metrics.
    (
        "triplet_euclidean",
        "TripletLoss",
        r#"{"distance_metric": "euclidean"}"#,
    ),
    (
        "triplet_cosine",
        "TripletLoss",
        r#"{"distance_metric": "cosine"}"#,
    ),
    (
        "triplet_manhattan",
        "TripletLoss",
        r#"{"distance_metric": "manhattan"}"#,
    ),
    // ContrastiveLoss distance metrics.
    (
        "contrastive_euclidean",
        "ContrastiveLoss",
        r#"{"distance_metric": "euclidean"}"#,
    ),
    (
        "contrastive_manhattan",
        "ContrastiveLoss",
        r#"{"distance_metric": "manhattan"}"#,
    ),
    (
        "contrastive_cosine_distance",
        "ContrastiveLoss",
        r#"{"distance_metric": "cosine_distance"}"#,
    ),
    (
        "contrastive_sum",
        "ContrastiveLoss",
        r#"{"size_average": false, "margin": 2.5}"#,
    ),
    // CosineSimilarityLoss loss functions and transformations.
    (
        "cosine_similarity_mse_identity",
        "CosineSimilarityLoss",
        r#"{"loss_fct": "mse", "cos_score_transformation": "identity"}"#,
    ),
    (
        "cosine_similarity_l1_sigmoid",
        "CosineSimilarityLoss",
        r#"{"loss_fct": "l1", "cos_score_transformation": "sigmoid"}"#,
    ),
    // CoSENTLoss similarity.
    (
        "cosent_pairwise_dot_score",
        "CoSENTLoss",
        r#"{"similarity_fct": "pairwise_dot_score"}"#,
    ),
    // MNRL similarity, directions, partition and hardness.
    (
        "mnrl_dot_score",
        "MultipleNegativesRankingLoss",
        r#"{"similarity_fct": "dot_score"}"#,
    ),
    (
        "mnrl_all_directions_joint",
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"],
            "partition_mode": "joint"}"#,
    ),
    (
        "mnrl_symmetric_per_direction",
        "MultipleNegativesRankingLoss",
        r#"{"directions": ["query_to_doc", "doc_to_query"], "partition_mode": "per_direction"}"#,
    ),
    (
        "mnrl_hardness_in_batch_negatives_s2",
        "MultipleNegativesRankingLoss",
        r#"{"hardness_mode": "in_batch_negatives", "hardness_strength": 2.0}"#,
    ),
    (
        "mnrl_hardness_hard_negatives_s2",
        "MultipleNegativesRankingLoss",
        r#"{"hardness_mode": "hard_negatives", "hardness_strength": 2.0}"#,
    ),
    (
        "mnrl_hardness_all_negatives_s2",
        "MultipleNegativesRankingLoss",
        r#"{"hardness_mode": "all_negatives", "hardness_strength": 2.0}"#,
    ),
];

fn params(json: &str) -> lossc::Params {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("bad test params {json}: {e}"))
}

fn compile(name: &str, class: &str, json: &str) -> lossc::ir::Graph {
    compile_std(class, &params(json)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// One test per loss class keeps failures readable; insta checks every
/// snapshot of the class before the test fails.
fn snapshot_class(class: &str) {
    let mut n = 0;
    for (name, c, json) in VARIANTS.iter().filter(|v| v.1 == class) {
        let graph = compile(name, c, json);
        let printed = lossc::ir::print::print_graph(&graph);
        insta::with_settings!({
            description => format!("{c} with {}", json.split_whitespace().collect::<Vec<_>>().join(" ")),
            omit_expression => true,
        }, {
            insta::assert_snapshot!(*name, printed);
        });
        n += 1;
    }
    assert!(n > 0, "no snapshot variant for {class}");
}

#[test]
fn ir_cosine_similarity_loss() {
    snapshot_class("CosineSimilarityLoss");
}

#[test]
fn ir_multiple_negatives_ranking_loss() {
    snapshot_class("MultipleNegativesRankingLoss");
}

#[test]
fn ir_triplet_loss() {
    snapshot_class("TripletLoss");
}

#[test]
fn ir_cosent_loss() {
    snapshot_class("CoSENTLoss");
}

#[test]
fn ir_contrastive_loss() {
    snapshot_class("ContrastiveLoss");
}

/// Every graph above passes the IR verifier (compile verifies too; this
/// keeps the guarantee even if that call moves).
#[test]
fn every_snapshot_graph_verifies() {
    let mut failures = Vec::new();
    for (name, class, json) in VARIANTS {
        let graph = compile(name, class, json);
        if let Err(e) = lossc::ir::verify::verify(&graph) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The defaults spelled out give the default graph: a parameter default in a
/// .loss file and the documented default agree.
#[test]
fn explicit_defaults_give_the_default_graph() {
    let pairs = [
        ("triplet_default", "triplet_euclidean"),
        ("contrastive_default", "contrastive_cosine_distance"),
        (
            "cosine_similarity_default",
            "cosine_similarity_mse_identity",
        ),
    ];
    let print = |name: &str| {
        let (_, class, json) = VARIANTS.iter().find(|v| v.0 == name).unwrap();
        lossc::ir::print::print_graph(&compile(name, class, json))
    };
    for (a, b) in pairs {
        assert_eq!(print(a), print(b), "{a} vs {b}");
    }
}
