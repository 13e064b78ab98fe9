//! Every fixture case's gradients (`grad.*` in the fixture files, computed by
//! PyTorch autograd on the real sentence-transformers losses) reproduced by
//! the symbolic gradient program: f64 to 1e-9, f32 to 1e-4.

mod common;
use common::*;

const CLASSES: &[&str] = &[
    "CosineSimilarityLoss",
    "MultipleNegativesRankingLoss",
    "TripletLoss",
    "CoSENTLoss",
    "ContrastiveLoss",
];

fn check_case(case: &Case, failures: &mut Vec<String>) {
    let tensors = read_case(case);
    let graph = match compile_std_for(&case.class, &case.params, &tensors) {
        Ok(g) => g,
        Err(e) => return failures.push(format!("{}: compile failed:\n{e}", case.id)),
    };
    let by_row = case.tags.iter().any(|t| t == "zero_vector");
    let expected: Vec<(String, Vec<usize>, Vec<f64>)> = tensors
        .iter()
        .filter_map(|(k, t)| {
            k.strip_prefix("grad.")
                .map(|n| (n.to_string(), t.shape.clone(), t.to_f64_vec()))
        })
        .collect();
    assert!(
        !expected.is_empty(),
        "{}: fixture has no gradients",
        case.id
    );
    for (dtype, rtol) in [("f64", 1e-9), ("f32", 1e-4)] {
        let result = if dtype == "f64" {
            grads_of::<f64>(&graph, &tensors)
        } else {
            grads_of::<f32>(&graph, &tensors)
        };
        let (_, grads) = match result {
            Ok(x) => x,
            Err(e) => return failures.push(format!("{} {dtype}: {e}", case.id)),
        };
        for (name, shape, want) in &expected {
            match grads.iter().find(|(n, _, _)| n == name) {
                None => failures.push(format!(
                    "{} {dtype}: no gradient for `{name}` (have {:?})",
                    case.id,
                    grads.iter().map(|g| &g.0).collect::<Vec<_>>()
                )),
                Some((_, gshape, got)) if gshape != shape => failures.push(format!(
                    "{} {dtype}: grad.{name} shape {gshape:?} vs {shape:?}",
                    case.id
                )),
                Some((_, _, got)) => {
                    let worst = grad_error(got, want, shape, rtol, by_row);
                    if worst > 1.0 {
                        failures.push(format!(
                            "{} {dtype}: grad.{name} off by {worst:.2}x the tolerance {rtol:e}",
                            case.id
                        ));
                    }
                }
            }
        }
    }
}

#[test]
fn fixture_gradients_match_reference() {
    let cases = manifest();
    let mut failures = Vec::new();
    let mut checked = 0;
    let program = lossc::elab::Program::new();
    for class in [
        "CosineSimilarityLoss",
        "MultipleNegativesRankingLoss",
        "TripletLoss",
        "CoSENTLoss",
        "ContrastiveLoss",
    ] {
        assert!(
            lossc::select_loss(&program, None, Some(class)).is_ok(),
            "{class} is missing"
        );
    }
    for case in &cases {
        if lossc::select_loss(&program, None, Some(&case.class)).is_err() {
            continue;
        }
        {
            check_case(case, &mut failures);
            checked += 1;
        }
    }
    assert!(checked > 0);
    assert!(
        failures.is_empty(),
        "{} problems in {checked} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} fixture cases: every gradient matches in f64 and f32");
}
