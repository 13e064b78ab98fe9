//! The size of the gradient program: for every standard loss (defaults and
//! the variants that change the graph), the node count of the optimised
//! forward program and of the optimised forward-plus-gradient program. Reverse
//! mode should cost a small constant factor; the test holds it to 3x and
//! prints the table (`cargo test --test node_counts -- --nocapture`).

mod common;
use common::{compile_std, params_of};

const MAX_RATIO: f64 = 3.0;

/// (loss class, variant label, parameters as JSON).
const VARIANTS: &[(&str, &str, &str)] = &[
    ("CosineSimilarityLoss", "default (mse, identity)", "{}"),
    ("CosineSimilarityLoss", "l1", r#"{"loss_fct": "l1"}"#),
    (
        "CosineSimilarityLoss",
        "sigmoid",
        r#"{"cos_score_transformation": "sigmoid"}"#,
    ),
    (
        "CosineSimilarityLoss",
        "l1, sigmoid",
        r#"{"loss_fct": "l1", "cos_score_transformation": "sigmoid"}"#,
    ),
    ("MultipleNegativesRankingLoss", "default (cos_sim)", "{}"),
    (
        "MultipleNegativesRankingLoss",
        "dot_score",
        r#"{"similarity_fct": "dot_score"}"#,
    ),
    (
        "MultipleNegativesRankingLoss",
        "all 4 directions, joint",
        r#"{"directions": ["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"]}"#,
    ),
    (
        "MultipleNegativesRankingLoss",
        "per_direction [query_to_doc, doc_to_query]",
        r#"{"directions": ["query_to_doc", "doc_to_query"], "partition_mode": "per_direction"}"#,
    ),
    (
        "MultipleNegativesRankingLoss",
        "hardness in_batch_negatives",
        r#"{"hardness_mode": "in_batch_negatives", "hardness_strength": 2.0}"#,
    ),
    (
        "MultipleNegativesRankingLoss",
        "hardness hard_negatives",
        r#"{"hardness_mode": "hard_negatives", "hardness_strength": 2.0}"#,
    ),
    (
        "MultipleNegativesRankingLoss",
        "hardness all_negatives",
        r#"{"hardness_mode": "all_negatives", "hardness_strength": 2.0}"#,
    ),
    ("TripletLoss", "default (euclidean)", "{}"),
    ("TripletLoss", "cosine", r#"{"distance_metric": "cosine"}"#),
    (
        "TripletLoss",
        "manhattan",
        r#"{"distance_metric": "manhattan"}"#,
    ),
    ("CoSENTLoss", "default (pairwise_cos_sim)", "{}"),
    (
        "CoSENTLoss",
        "pairwise_dot_score",
        r#"{"similarity_fct": "pairwise_dot_score"}"#,
    ),
    ("ContrastiveLoss", "default (cosine_distance)", "{}"),
    (
        "ContrastiveLoss",
        "euclidean",
        r#"{"distance_metric": "euclidean"}"#,
    ),
    (
        "ContrastiveLoss",
        "manhattan",
        r#"{"distance_metric": "manhattan"}"#,
    ),
    (
        "ContrastiveLoss",
        "size_average false",
        r#"{"size_average": false}"#,
    ),
];

struct Row {
    class: &'static str,
    variant: &'static str,
    forward: usize,
    full: usize,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.full as f64 / self.forward as f64
    }
}

fn count(class: &'static str, variant: &'static str, params: &str) -> Row {
    let graph = compile_std(class, &params_of(params)).unwrap_or_else(|e| panic!("{e}"));
    let forward = lossc::opt::optimize(&graph).0.nodes.len();
    let full = lossc::differentiate(&graph).0.nodes.len();
    Row {
        class,
        variant,
        forward,
        full,
    }
}

#[test]
fn gradient_program_is_at_most_three_times_the_forward_program() {
    let rows: Vec<Row> = VARIANTS
        .iter()
        .map(|(class, variant, params)| count(class, variant, params))
        .collect();
    let mut table = String::from(
        "| loss | variant | forward nodes | forward+grad nodes | ratio |\n|---|---|---:|---:|---:|\n",
    );
    for r in &rows {
        table.push_str(&format!(
            "| {} | {} | {} | {} | {:.2} |\n",
            r.class,
            r.variant,
            r.forward,
            r.full,
            r.ratio()
        ));
    }
    eprintln!("{table}");
    let over: Vec<String> = rows
        .iter()
        .filter(|r| r.ratio() > MAX_RATIO)
        .map(|r| format!("{} {}: {:.2}", r.class, r.variant, r.ratio()))
        .collect();
    assert!(over.is_empty(), "over {MAX_RATIO}x: {over:?}\n{table}");
    for r in &rows {
        assert!(
            r.forward > 0 && r.full > r.forward,
            "{} {}",
            r.class,
            r.variant
        );
    }
}

/// Matryoshka(MNRL) normalises each truncation, and `cos_sim` takes the
/// norms of those normalised rows again: the optimiser computes those norms
/// from the sums of squares it already has (`hoist`'s squared norms, through
/// the concat of positives and negatives), so no normalised copy of an
/// input is left in the forward program, once `prefix` has taken the
/// contractions to the raw inputs.
#[test]
fn matryoshka_keeps_no_normalised_copy_of_its_inputs() {
    let params = params_of(
        r#"{"loss": "MultipleNegativesRankingLoss", "matryoshka_dims": [768, 384, 192, 96]}"#,
    );
    let graph = compile_std("MatryoshkaLoss", &params).expect("compiles");
    let (fwd, report) = lossc::opt::optimize(&graph);
    assert!(report.fired.get("hoist-square").copied().unwrap_or(0) >= 4);
    let inputs: Vec<&str> = fwd.inputs().map(|(_, _, name, _)| name).collect();
    let copies: Vec<String> = fwd
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.kind, lossc::ir::NodeKind::Comp(_)))
        .filter(|(_, n)| n.name.as_deref().is_some_and(|s| inputs.contains(&s)))
        .map(|(i, n)| lossc::ir::print::print_node(&fwd, lossc::ir::NodeId(i as u32), n))
        .collect();
    assert!(
        copies.is_empty(),
        "normalised copies left:\n{}",
        copies.join("\n")
    );
}
