//! The whole standard library, class by class (every sentence-transformers
//! class the fixture manifest names): it exists, its IR and gradient IR are
//! pinned by snapshots, and its symbolic gradient passes finite differences at
//! the reference inputs (detached terms held constant where the loss has any).

mod common;
use common::*;
use std::collections::BTreeMap;

/// The first case of every class, in class order.
fn first_case_per_class() -> Vec<Case> {
    let mut seen = BTreeMap::new();
    for case in manifest() {
        seen.entry(case.class.clone()).or_insert(case);
    }
    seen.into_values().collect()
}

#[test]
fn every_manifest_class_is_in_the_library() {
    let program = lossc::elab::Program::new();
    let missing: Vec<String> = first_case_per_class()
        .into_iter()
        .map(|c| c.class)
        .filter(|c| lossc::select_loss(&program, None, Some(c)).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "classes without a loss in losses/: {missing:?}"
    );
}

#[test]
fn ir_and_gradient_ir_of_every_library_loss() {
    for case in first_case_per_class() {
        let tensors = read_case(&case);
        let graph = compile_std_for(&case.class, &case.params, &tensors)
            .unwrap_or_else(|e| panic!("{}: {e}", case.id));
        let forward = lossc::opt::optimize(&graph).0;
        let (full, _) = lossc::differentiate(&graph);
        insta::assert_snapshot!(
            format!("library_ir_{}", case.class),
            lossc::ir::print::print_graph(&forward)
        );
        insta::assert_snapshot!(
            format!("library_grad_{}", case.class),
            lossc::ir::print::print_graph(&full)
        );
    }
}

#[test]
fn gradcheck_every_library_loss_at_its_reference_inputs() {
    let mut failures = Vec::new();
    for case in first_case_per_class() {
        let tensors = read_case(&case);
        let graph = compile_std_for(&case.class, &case.params, &tensors)
            .unwrap_or_else(|e| panic!("{}: {e}", case.id));
        let (full, _) = lossc::differentiate(&graph);
        let opts = lossc::gradcheck::Options {
            directions: 4,
            max_coordinates: 64,
            seed: 1,
        };
        match lossc::gradcheck::check(&graph, &full, &tensors, &opts) {
            Ok(report) => {
                for r in &report.inputs {
                    if r.worst > 1e-5 || r.checks == 0 {
                        failures.push(format!(
                            "{} {}: worst {:.2e} over {} checks ({} kinks)",
                            case.id, r.name, r.worst, r.checks, r.kinks
                        ));
                    }
                }
            }
            Err(d) => failures.push(format!(
                "{}: {}",
                case.id,
                d.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "gradcheck failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn the_library_readme_lists_every_loss() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/losses/README.md"))
        .expect("losses/README.md");
    let program = lossc::elab::Program::new();
    for entry in lossc::library_catalogue(&program) {
        assert!(
            readme.contains(&format!("| {} |", entry.name)),
            "losses/README.md lacks {}; regenerate with `lossc list --format markdown`",
            entry.name
        );
    }
}

/// The optimised forward-plus-gradient program stays within 3x the forward
/// program's node count for every library loss (its first fixture case).
#[test]
fn gradient_programs_stay_small() {
    let mut rows = vec![
        "| loss | forward nodes | forward+grad nodes | ratio |".to_string(),
        "|---|---:|---:|---:|".to_string(),
    ];
    let mut over = Vec::new();
    for case in first_case_per_class() {
        let tensors = read_case(&case);
        let graph = compile_std_for(&case.class, &case.params, &tensors)
            .unwrap_or_else(|e| panic!("{}: {e}", case.id));
        let forward = lossc::opt::optimize(&graph).0.nodes.len();
        let full = lossc::differentiate(&graph).0.nodes.len();
        let ratio = full as f64 / forward as f64;
        rows.push(format!(
            "| {} | {forward} | {full} | {ratio:.2} |",
            case.class
        ));
        if ratio > 3.0 {
            over.push(format!("{} ({ratio:.2})", case.class));
        }
    }
    eprintln!("{}", rows.join("\n"));
    assert!(
        over.is_empty(),
        "gradient programs over 3x the forward: {over:?}"
    );
}
