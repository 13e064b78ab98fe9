//! The program suite: every `tests/programs/**/*.loss` file is a test, and
//! its expectations are written in its own comments (as in Crafting
//! Interpreters' test suite). One harness runs them all and reports every
//! failing file at once.
//!
//! Directives are comment lines of the form `# key: value`, anywhere in the
//! file:
//!
//! - `# inputs: {JSON}`: tensors, read with `tensor_io::read_json_str` (ints
//!   become i64, floats f64). Several `# inputs:` lines are merged, so long
//!   inputs can be split over lines.
//! - `# params: {JSON}`: the loss's parameters (several lines are merged).
//! - `# loss: Name`: which loss of the file to run (default: the only one).
//! - `# expect: loss = 1.25`, `# expect: <output> = x`: a value, evaluated in
//!   f64 by the interpreter and compared to relative `rtol` (`# rtol: 1e-6`,
//!   default 1e-12); `nan` expects NaN. Every value is also evaluated in f32
//!   and compared to relative 1e-4, unless the file says `# f32: skip`.
//! - `# expect-error: LC0101 at 4:13`: one line per expected error. The set of
//!   (code, line, col) of the errors produced must equal the set expected, so
//!   a file with several independent errors proves they are all reported in
//!   one run. A diagnostic in another file (one the test `use`s) is written
//!   `LC0001 at helper.loss:2:5`; one without a location (an unexpected
//!   tensor key, say) is written with the code alone: `LC0502`.
//! - `# expect: module`: the file only declares functions for other tests to
//!   `use`; it must load and check without errors, and no loss is run.
//!
//! Where errors come from: a file without `# params:` is checked like
//! `lossc check` (`check_file`: every loss with its default parameters); with
//! `# params:`, the chosen loss is compiled with them. When compilation is
//! clean and the file has `# inputs:` or value expectations, the loss is bound
//! to the inputs and evaluated: binding and evaluation errors (codes LC05xx)
//! are matched with the same `# expect-error:` lines.
//!
//! Every file must carry at least one expectation; a file without one fails.
//! The one exception is a file with no text at all (only whitespace), which
//! cannot hold a comment: it is expected to give `LC0002 at 1:1`.
//! Each file runs under `catch_unwind`: the compiler must never panic on user
//! input, and a panic is reported as a failure naming the file. A file may
//! carry one kind of expectation only (values, errors, or module).
//!
//! Layout: `ok/` holds programs that compile and compute values worked out
//! independently of lossc (by hand or a few lines of plain Python, never
//! copied from lossc's own output), `errors/` holds malformed
//! programs, one mistake per file unless the file says it tests several. To
//! write a new error test, run `lossc check FILE` (or `lossc run`) to see the
//! diagnostics, check that each points where a reader would look, and copy
//! the code and `line:col` into `# expect-error:` lines.

use lossc::elab::Program;
use lossc::syntax::{Diagnostic, FileId};
use lossc::tensor_io::{read_json_str, TensorMap};
use lossc::{bind, interp, Params};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn programs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs")
}

/// Every `.loss` file under `dir`, sorted, recursively.
fn loss_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        if p.is_dir() {
            loss_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "loss") {
            out.push(p);
        }
    }
}

/// One expected or produced error: its code and, when it has one, its place
/// (`4:13`, or `helper.loss:4:13` in another file).
type ErrorKey = (String, Option<String>);

fn show_key(k: &ErrorKey) -> String {
    match &k.1 {
        Some(at) => format!("{} at {at}", k.0),
        None => k.0.clone(),
    }
}

/// What a test file says about itself.
#[derive(Default)]
struct Spec {
    inputs: Option<serde_json::Map<String, serde_json::Value>>,
    params: Option<Params>,
    loss: Option<String>,
    values: Vec<(String, f64)>,
    errors: BTreeSet<ErrorKey>,
    module: bool,
    rtol: Option<f64>,
    f32_skip: bool,
}

/// Merges one more JSON object line into `slot`.
fn merge_object(
    slot: &mut Option<serde_json::Map<String, serde_json::Value>>,
    text: &str,
    what: &str,
    line: usize,
) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("line {line}: `# {what}:` is not valid JSON: {e}"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!("line {line}: `# {what}:` must be a JSON object"));
    };
    slot.get_or_insert_with(Default::default).extend(map);
    Ok(())
}

fn parse_spec(text: &str) -> Result<Spec, String> {
    let mut spec = Spec::default();
    if text.trim().is_empty() {
        spec.errors
            .insert(("LC0002".to_string(), Some("1:1".to_string())));
        return Ok(spec);
    }
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let Some(comment) = raw.trim_start().strip_prefix('#') else {
            continue;
        };
        let Some((key, value)) = comment.trim().split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "inputs" => merge_object(&mut spec.inputs, value, "inputs", line)?,
            "params" => merge_object(&mut spec.params, value, "params", line)?,
            "loss" => spec.loss = Some(value.to_string()),
            "rtol" => {
                spec.rtol = Some(
                    value
                        .parse()
                        .map_err(|_| format!("line {line}: bad rtol `{value}`"))?,
                )
            }
            "f32" if value == "skip" => spec.f32_skip = true,
            "f32" => return Err(format!("line {line}: `# f32:` only takes `skip`")),
            "expect" if value == "module" => spec.module = true,
            "expect" => {
                let (name, x) = value
                    .split_once('=')
                    .ok_or_else(|| format!("line {line}: expected `# expect: name = value`"))?;
                let x: f64 = x
                    .trim()
                    .parse()
                    .map_err(|_| format!("line {line}: `{}` is not a number", x.trim()))?;
                spec.values.push((name.trim().to_string(), x));
            }
            "expect-error" => {
                let (code, at) = match value.split_once(" at ") {
                    Some((c, a)) => (c.trim(), Some(a.trim().to_string())),
                    None => (value, None),
                };
                if !code.starts_with("LC") || code.len() != 6 {
                    return Err(format!("line {line}: `{code}` is not a diagnostic code"));
                }
                spec.errors.insert((code.to_string(), at));
            }
            // A misspelt expectation must not silently pass.
            k if k.starts_with("expect") => {
                return Err(format!("line {line}: unknown directive `# {k}:`"))
            }
            _ => {}
        }
    }
    let kinds = usize::from(!spec.values.is_empty())
        + usize::from(!spec.errors.is_empty())
        + usize::from(spec.module);
    match kinds {
        0 => Err("no expectation: add `# expect: loss = ...`, `# expect-error: CODE at L:C` or `# expect: module`".into()),
        1 => Ok(spec),
        _ => Err("mixes kinds of expectation (values, errors, module); use one".into()),
    }
}

/// The key of a produced diagnostic, its place relative to the test file.
fn key_of(d: &Diagnostic, program: &Program, main: FileId) -> ErrorKey {
    let at = d.span.map(|s| {
        let (line, col) = program.sources.line_col(s.file, s.start);
        if s.file == main {
            format!("{line}:{col}")
        } else {
            let name = &program.sources.get(s.file).name;
            let base = Path::new(name)
                .file_name()
                .map_or(name.clone(), |b| b.to_string_lossy().into_owned());
            format!("{base}:{line}:{col}")
        }
    });
    (d.code.to_string(), at)
}

/// Runs one file; `Err` says why it fails.
fn run_file(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let spec = parse_spec(&text)?;
    let name = path
        .strip_prefix(programs_dir())
        .unwrap_or(path)
        .display()
        .to_string();
    let mut program = Program::new();
    let read = |p: &Path| std::fs::read_to_string(p);
    let file = program.add_file(&name, path.parent().map(Path::to_path_buf), &text, &read);

    // Compile-time errors. Errors in files this one `use`s are not the main
    // file's load errors, so they are collected separately (the standard
    // library, which has no directory, is not this test's business).
    let mut diags: Vec<Diagnostic> = program
        .load_errors(None)
        .into_iter()
        .filter(|d| {
            d.span
                .is_some_and(|s| s.file != file && program.sources.get(s.file).dir.is_some())
        })
        .collect();
    let mut graph = None;
    let run = !spec.values.is_empty() || spec.inputs.is_some() || spec.params.is_some();
    if spec.params.is_none() {
        diags.extend(lossc::check_file(&program, file));
    }
    if run && diags.iter().all(|d| !d.is_error()) {
        let errors = program.load_errors(Some(file));
        if errors.is_empty() {
            match lossc::select_loss(&program, Some(file), spec.loss.as_deref()) {
                Ok((f, decl)) => {
                    let params = spec.params.clone().unwrap_or_default();
                    match lossc::compile(&program, f, decl, &params) {
                        Ok(g) => graph = Some(g),
                        Err(mut d) => diags.append(&mut d),
                    }
                }
                Err(d) => diags.push(d),
            }
        } else {
            diags.extend(errors);
        }
    }

    // Run-time errors and values.
    let mut outputs64 = None;
    let mut outputs32 = None;
    if let Some(graph) = &graph {
        let json = serde_json::Value::Object(spec.inputs.clone().unwrap_or_default());
        let tensors: TensorMap =
            read_json_str(&json.to_string(), &name).map_err(|e| format!("bad `# inputs:`: {e}"))?;
        match bind::bind(graph, &tensors) {
            Ok(bound) => {
                match interp::evaluate::<f64>(graph, &bound) {
                    Ok(e) => outputs64 = Some(e.outputs),
                    Err(d) => diags.push(d),
                }
                if !spec.f32_skip && !spec.values.is_empty() {
                    match interp::evaluate::<f32>(graph, &bound) {
                        Ok(e) => outputs32 = Some(e.outputs),
                        Err(d) => diags.push(d),
                    }
                }
            }
            Err(mut d) => diags.append(&mut d),
        }
    }

    let got: BTreeSet<ErrorKey> = diags
        .iter()
        .filter(|d| d.is_error())
        .map(|d| key_of(d, &program, file))
        .collect();
    if got != spec.errors {
        let missing: Vec<String> = spec.errors.difference(&got).map(show_key).collect();
        let extra: Vec<String> = got.difference(&spec.errors).map(show_key).collect();
        let mut msg = String::new();
        if !missing.is_empty() {
            msg.push_str(&format!(
                "expected but not reported: {}\n",
                missing.join(", ")
            ));
        }
        if !extra.is_empty() {
            msg.push_str(&format!(
                "reported but not expected: {}\n",
                extra.join(", ")
            ));
        }
        let rendered: Vec<String> = diags.iter().map(|d| d.render(&program.sources)).collect();
        msg.push_str(&rendered.join("\n"));
        return Err(msg);
    }
    if spec.values.is_empty() {
        return Ok(());
    }
    let outputs64 = outputs64.ok_or("values are expected but nothing was evaluated")?;
    let rtol = spec.rtol.unwrap_or(1e-12);
    let mut problems = Vec::new();
    for (out, want) in &spec.values {
        let mut check = |outputs: &[(String, f64)], tol: f64, prec: &str| match outputs
            .iter()
            .find(|(n, _)| n == out)
        {
            None => problems.push(format!(
                "no output `{out}` (outputs: {})",
                outputs
                    .iter()
                    .map(|o| o.0.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some((_, got)) => {
                let ok = if want.is_nan() {
                    got.is_nan()
                } else {
                    close(*got, *want, tol)
                };
                if !ok {
                    problems.push(format!(
                        "{prec}: {out} = {got:e}, expected {want:e} (rel {:.2e}, rtol {tol:e})",
                        (got - want).abs() / want.abs()
                    ));
                }
            }
        };
        check(&outputs64, rtol, "f64");
        if let Some(o32) = &outputs32 {
            let o32: Vec<(String, f64)> = o32.iter().map(|(n, x)| (n.clone(), *x as f64)).collect();
            check(&o32, 1e-4_f64.max(rtol), "f32");
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("\n"))
    }
}

/// |got - want| <= rtol * max(|want|, 1e-300); NaN never passes.
fn close(got: f64, want: f64, rtol: f64) -> bool {
    (got - want).abs() <= rtol * want.abs().max(1e-300)
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

#[test]
fn programs() {
    let mut files = Vec::new();
    loss_files(&programs_dir(), &mut files);
    assert!(!files.is_empty(), "no test programs under tests/programs");
    let mut failures = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(programs_dir()).unwrap_or(path).display();
        match std::panic::catch_unwind(|| run_file(path)) {
            Ok(Ok(())) => {}
            Ok(Err(why)) => failures.push(format!("── {rel}\n{why}")),
            Err(p) => failures.push(format!(
                "── {rel}\nPANICKED (the compiler must never panic on user input): {}",
                panic_message(p.as_ref())
            )),
        }
    }
    if !failures.is_empty() {
        panic!(
            "{} of {} programs failed:\n\n{}",
            failures.len(),
            files.len(),
            failures.join("\n\n")
        );
    }
    eprintln!("{} programs passed", files.len());
}
