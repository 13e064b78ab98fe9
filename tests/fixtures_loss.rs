//! Every fixture case of the standard losses reproduces the reference value:
//! f64 to 1e-9 relative and f32 to 1e-4 (the real sentence-transformers
//! numbers, computed in float64; see tests/fixtures/README.md).

mod common;
use common::*;

/// The classes that must be in the standard library and pass; every other
/// manifest class that the library has is checked too.
const REQUIRED: &[&str] = &[
    "CosineSimilarityLoss",
    "MultipleNegativesRankingLoss",
    "TripletLoss",
    "CoSENTLoss",
    "ContrastiveLoss",
];

/// The manifest classes the standard library defines (and the required ones).
fn library_classes(cases: &[Case]) -> Vec<String> {
    let program = lossc::elab::Program::new();
    let mut classes: Vec<String> = cases.iter().map(|c| c.class.clone()).collect();
    classes.sort();
    classes.dedup();
    classes.retain(|c| {
        lossc::select_loss(&program, None, Some(c)).is_ok() || REQUIRED.contains(&c.as_str())
    });
    classes
}

#[test]
fn fixture_losses_match_reference_in_f64_and_f32() {
    let cases = manifest();
    let mut failures = Vec::new();
    let mut checked = 0;
    for class in &library_classes(&cases) {
        let of_class: Vec<&Case> = cases.iter().filter(|c| &c.class == class).collect();
        assert!(!of_class.is_empty(), "no fixture case for {class}");
        for case in of_class {
            let tensors = read_case(case);
            let graph = match compile_std_for(&case.class, &case.params, &tensors) {
                Ok(g) => g,
                Err(e) => {
                    failures.push(format!("{}: compile failed:\n{e}", case.id));
                    continue;
                }
            };
            let reference: f64 = tensors["loss"].to_f64_vec()[0];
            assert!(
                close(case.loss, reference, 1e-14),
                "{}: manifest and file disagree",
                case.id
            );
            // Every `component.<name>` of the file is an output of the same name.
            for (dtype, rtol) in [("f64", 1e-9), ("f32", 1e-4)] {
                let out = if dtype == "f64" {
                    eval64(&graph, &tensors)
                } else {
                    eval32(&graph, &tensors)
                };
                let Ok(out) = out else { continue };
                let expected: Vec<&str> = tensors
                    .keys()
                    .filter_map(|k| k.strip_prefix("component."))
                    .collect();
                if !expected.is_empty() {
                    for (n, _) in &out[1..] {
                        if !expected.contains(&n.as_str()) {
                            failures.push(format!(
                                "{} {dtype}: component `{n}` is not in the reference",
                                case.id
                            ));
                        }
                    }
                }
                for (key, t) in tensors.iter().filter(|(k, _)| k.starts_with("component.")) {
                    let name = &key["component.".len()..];
                    let want = t.to_f64_vec()[0];
                    match out.iter().find(|(n, _)| n == name) {
                        Some((_, got))
                            if close(*got, want, rtol) || (want == 0.0 && got.abs() < rtol) => {}
                        Some((_, got)) => failures.push(format!(
                            "{} {dtype}: component {name} = {got}, reference {want}",
                            case.id
                        )),
                        None => failures.push(format!("{}: no output named `{name}`", case.id)),
                    }
                }
            }
            match eval64(&graph, &tensors) {
                Ok(out) if close(out[0].1, reference, 1e-9) => {}
                Ok(out) => failures.push(format!(
                    "{}: f64 loss {} vs reference {reference} (rel {:.2e})",
                    case.id,
                    out[0].1,
                    (out[0].1 - reference).abs() / reference.abs()
                )),
                Err(e) => failures.push(format!("{}: f64 evaluation failed: {e}", case.id)),
            }
            match eval32(&graph, &tensors) {
                Ok(out) if close(out[0].1, reference, 1e-4) => {}
                Ok(out) => failures.push(format!(
                    "{}: f32 loss {} vs reference {reference}",
                    case.id, out[0].1
                )),
                Err(e) => failures.push(format!("{}: f32 evaluation failed: {e}", case.id)),
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} fixture cases match in f64 and f32");
}
