//! The `lossc` command line, end to end: the real binary run as a process,
//! checked on its exit status (0 success, 1 diagnostics or runtime errors,
//! 2 usage errors) and on the key parts of what it prints.
//!
//! Covered: usage errors and `--help`; parameter diagnostics (LC03xx) and
//! unknown losses (LC0401); tensor-file diagnostics (LC05xx) for every way a
//! file can disagree with a loss; `.safetensors`, `.json` and `.npz` inputs
//! agreeing; seeded random runs of every standard loss in text and JSON; every
//! reference fixture of the standard losses through `--params @FILE
//! --inputs FILE` in f64 and f32; `lossc check` and `lossc ir`.
//!
//! Tensor files and .loss files are written under a fresh folder per test in
//! `std::env::temp_dir()`, removed when the test ends; fixtures are only read.

mod common;
use common::*;

use lossc::tensor_io::{read_tensors, write_safetensors, HostTensor, TensorData, TensorMap};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The standard losses, as their sentence-transformers class names.
const STD_LOSSES: &[&str] = &[
    "CosineSimilarityLoss",
    "MultipleNegativesRankingLoss",
    "TripletLoss",
    "CoSENTLoss",
    "ContrastiveLoss",
];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// What one run of the binary did.
struct Out {
    args: Vec<String>,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Everything about the run, for assertion messages.
    fn show(&self) -> String {
        format!(
            "lossc {}\n--- exit {} ---\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.code,
            self.stdout,
            self.stderr
        )
    }

    /// Asserts the exit status and that stderr contains every needle.
    fn expect(&self, code: i32, stderr_needles: &[&str]) -> &Out {
        assert_eq!(self.code, code, "wrong exit status\n{}", self.show());
        for needle in stderr_needles {
            assert!(
                self.stderr.contains(needle),
                "stderr lacks {needle:?}\n{}",
                self.show()
            );
        }
        self
    }

    /// A failing run writes nothing to stdout (scripts read stdout).
    fn no_stdout(&self) -> &Out {
        assert!(
            self.stdout.is_empty(),
            "a failing run printed to stdout\n{}",
            self.show()
        );
        self
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e})\n{}", self.show()))
    }

    /// The `loss` of a `--format json` run, which must be a finite number.
    fn json_loss(&self) -> f64 {
        let json = self.json();
        let loss = json["loss"]
            .as_f64()
            .unwrap_or_else(|| panic!("`loss` is not a number\n{}", self.show()));
        assert!(loss.is_finite(), "loss is not finite\n{}", self.show());
        loss
    }

    /// The value of the first line of a text run, `Name = value`.
    fn text_loss(&self, name: &str) -> f64 {
        let first = self.stdout.lines().next().unwrap_or_default();
        let value = first
            .strip_prefix(&format!("{name} = "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("first line is not `{name} = <number>`\n{}", self.show()));
        assert!(value.is_finite(), "loss is not finite\n{}", self.show());
        value
    }
}

/// Runs the binary from the crate root (so `losses/` resolves).
fn lossc<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = Command::new(env!("CARGO_BIN_EXE_lossc"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("NO_COLOR", "1")
        .output()
        .expect("the lossc binary runs");
    Out {
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        code: output
            .status
            .code()
            .unwrap_or_else(|| panic!("lossc {args:?} was killed by a signal")),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A path argument as a string (temp paths are valid UTF-8 here).
fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// A fresh, empty folder for one test; removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("lossc-cli-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write scratch file");
        path
    }

    fn safetensors(&self, name: &str, tensors: &TensorMap) -> PathBuf {
        let path = self.path(name);
        write_safetensors(&path, tensors).expect("write safetensors");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic, well-conditioned values (no two rows alike).
fn values(n: usize, salt: f64) -> Vec<f64> {
    (0..n)
        .map(|k| ((k as f64 + 1.0) * 0.7548776662 + salt).sin())
        .collect()
}

/// Valid inputs of the pair losses (sentence1, sentence2 [b, d]; labels [b]).
fn pair_inputs(b: usize, d: usize) -> TensorMap {
    TensorMap::from([
        (
            "sentence1".to_string(),
            HostTensor::f64(vec![b, d], values(b * d, 0.1)),
        ),
        (
            "sentence2".to_string(),
            HostTensor::f64(vec![b, d], values(b * d, 0.9)),
        ),
        (
            "labels".to_string(),
            HostTensor::f64(vec![b], (0..b).map(|i| (i % 2) as f64).collect()),
        ),
    ])
}

/// A loss with an int input, for dtype mismatches.
const INT_LABELS_LOSS: &str = "\
loss IntLabels() {
    input x: [B, D]
    input labels: int[B]
    mean(i) x[i, 0] * float(labels[i])
}
";

/// The ids of the fixture cases whose loss lossc's standard library covers.
fn std_cases() -> Vec<Case> {
    manifest()
        .into_iter()
        .filter(|c| STD_LOSSES.contains(&c.class.as_str()))
        .collect()
}

fn std_case(id: &str) -> Case {
    std_cases()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no fixture case `{id}`"))
}

/// The `input.*` tensors of a fixture, without the reference outputs.
fn case_inputs(case: &Case) -> TensorMap {
    read_case(case)
        .into_iter()
        .filter(|(k, _)| k.starts_with("input."))
        .collect()
}

fn params_file(scratch: &Scratch, name: &str, params: &lossc::Params) -> PathBuf {
    scratch.write(
        name,
        serde_json::to_string(&serde_json::Value::Object(params.clone())).unwrap(),
    )
}

// ---------------------------------------------------------------------------
// Usage errors: exit 2, a one-line `error:` on stderr, nothing on stdout
// ---------------------------------------------------------------------------

#[test]
fn unknown_subcommand_is_a_usage_error() {
    lossc(["frobnicate"]).expect(2, &["frobnicate"]).no_stdout();
    lossc(Vec::<&str>::new()).expect(2, &["Usage"]).no_stdout();
}

#[test]
fn unknown_flag_is_a_usage_error() {
    for sub in ["run", "ir", "check"] {
        lossc([sub, "--loss-name", "TripletLoss"])
            .expect(2, &["--loss-name"])
            .no_stdout();
    }
}

#[test]
fn bad_jit_run_options_are_usage_errors() {
    for sub in ["run", "bench"] {
        lossc([sub, "--loss", "TripletLoss", "--threads", "0"])
            .expect(2, &["--threads", "at least 1"])
            .no_stdout();
        lossc([sub, "--loss", "TripletLoss", "--threads", "5000"])
            .expect(2, &["--threads", "at most 1024"])
            .no_stdout();
        lossc([sub, "--loss", "TripletLoss", "--tile-rows", "0"])
            .expect(2, &["--tile-rows", "at least 1"])
            .no_stdout();
        lossc([sub, "--loss", "TripletLoss", "--stream", "sometimes"])
            .expect(2, &["sometimes", "auto", "always", "never"])
            .no_stdout();
    }
}

#[test]
fn streamed_and_threaded_runs_print_the_same_loss() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--loss",
            "MultipleNegativesRankingLoss",
            "--dims",
            "B=40,D=6",
        ];
        args.extend_from_slice(extra);
        let out = lossc(&args);
        out.expect(0, &[]);
        out.text_loss("MultipleNegativesRankingLoss")
    };
    let reference = run(&["--backend", "interp"]);
    for extra in [
        &["--stream", "always", "--tile-rows", "7", "--threads", "2"][..],
        &["--stream", "never", "--threads", "1"][..],
    ] {
        let got = run(extra);
        assert!(
            (got - reference).abs() <= 1e-12 * reference.abs(),
            "{extra:?}: {got} vs the interpreter's {reference}"
        );
    }
}

#[test]
fn bad_dtype_and_format_values_are_usage_errors() {
    lossc(["run", "--loss", "TripletLoss", "--dtype", "f16"])
        .expect(2, &["f16", "f32", "f64"])
        .no_stdout();
    lossc(["run", "--loss", "TripletLoss", "--format", "xml"])
        .expect(2, &["xml", "text", "json"])
        .no_stdout();
    lossc(["run", "--loss", "TripletLoss", "--seed", "-3"])
        .expect(2, &["-3"])
        .no_stdout();
}

#[test]
fn bad_params_are_usage_errors_for_run_and_ir() {
    for sub in ["run", "ir"] {
        lossc([sub, "--loss", "TripletLoss", "--params", "{not json"])
            .expect(2, &["error:", "--params", "not valid JSON"])
            .no_stdout();
        lossc([sub, "--loss", "TripletLoss", "--params", "[1,2]"])
            .expect(2, &["--params", "must be a JSON object", "[1,2]"])
            .no_stdout();
        lossc([
            sub,
            "--loss",
            "TripletLoss",
            "--params",
            "@/nonexistent.json",
        ])
        .expect(2, &["--params", "/nonexistent.json"])
        .no_stdout();
        lossc([sub, "--loss", "TripletLoss", "--set", "novalue"])
            .expect(2, &["--set", "KEY=VALUE", "novalue"])
            .no_stdout();
    }
}

#[test]
fn params_file_that_is_not_json_is_a_usage_error() {
    let s = Scratch::new("params_file_not_json");
    let bad = s.write("bad.json", "scale: 20");
    let arg = format!("@{}", p(&bad));
    lossc(["run", "--loss", "TripletLoss", "--params", &arg])
        .expect(2, &[p(&bad), "not valid JSON"])
        .no_stdout();
}

#[test]
fn bad_dims_are_usage_errors() {
    for dims in ["B=x", "B", "B=-1", "B=1.5"] {
        lossc(["run", "--loss", "TripletLoss", "--dims", dims])
            .expect(2, &["--dims", dims])
            .no_stdout();
    }
}

#[test]
fn run_and_ir_need_a_file_or_a_loss_name() {
    for sub in ["run", "ir"] {
        lossc([sub]).expect(2, &["--loss NAME"]).no_stdout();
    }
}

#[test]
fn missing_paths_are_usage_errors() {
    lossc(["check", "/nonexistent"])
        .expect(2, &["/nonexistent"])
        .no_stdout();
    lossc(["check"]).expect(2, &["PATH"]).no_stdout();
    lossc(["run", "/nonexistent.loss"])
        .expect(2, &["/nonexistent.loss"])
        .no_stdout();
    lossc(["ir", "/nonexistent.loss"])
        .expect(2, &["/nonexistent.loss"])
        .no_stdout();
}

#[test]
fn grads_out_writes_every_fixture_gradient_and_nothing_on_failure() {
    let dir = Scratch::new("grads_out");
    // A case with three negative columns: keys come back per column.
    let case = manifest()
        .into_iter()
        .find(|c| c.id == "mnrl_3neg_cos_s20_b4_d8")
        .expect("case");
    let params = dir.write("params.json", serde_json::to_string(&case.params).unwrap());
    let out_path = dir.path("grads.safetensors");
    let out = lossc([
        "run",
        "--loss",
        &case.class,
        "--params",
        &format!("@{}", p(&params)),
        "--inputs",
        p(&case.file),
        "--grads-out",
        p(&out_path),
    ]);
    out.expect(0, &[]);
    let written = read_tensors(&out_path).expect("grads file reads back");
    let reference = read_tensors(&case.file).expect("fixture");
    let want: Vec<&String> = reference
        .keys()
        .filter(|k| k.starts_with("grad."))
        .collect();
    let got: Vec<&String> = written.keys().collect();
    assert_eq!(got, want, "same gradient keys as the fixture");
    for key in want {
        let (g, w) = (written[key].to_f64_vec(), reference[key].to_f64_vec());
        let worst = grad_error(&g, &w, &reference[key].shape, 1e-9, false);
        assert!(worst <= 1.0, "{key}: {worst}x the tolerance");
        assert_eq!(written[key].dtype_name(), "f64");
    }
    // f32 evaluation writes f32 tensors.
    let out32 = lossc([
        "run",
        "--loss",
        &case.class,
        "--params",
        &format!("@{}", p(&params)),
        "--inputs",
        p(&case.file),
        "--grads-out",
        p(&out_path),
        "--dtype",
        "f32",
    ]);
    out32.expect(0, &[]);
    assert_eq!(
        read_tensors(&out_path).unwrap()["grad.anchor"].dtype_name(),
        "f32"
    );
    // A directory that does not exist: a diagnostic, exit 1, and no file.
    let bad = dir.path("missing/g.safetensors");
    lossc(["run", "--loss", "TripletLoss", "--grads-out", p(&bad)]).expect(1, &["LC0507"]);
    assert!(!bad.exists());
}

#[test]
fn help_of_every_subcommand_exits_0_and_names_its_flags() {
    let top = lossc(["--help"]);
    top.expect(0, &[]);
    for word in ["check", "run", "ir", "--loss"] {
        assert!(
            top.stdout.contains(word),
            "top help lacks {word}\n{}",
            top.show()
        );
    }
    let cases: &[(&str, &[&str])] = &[
        ("check", &["PATH", "--help"]),
        (
            "run",
            &[
                "FILE",
                "--loss",
                "--params",
                "--set",
                "--inputs",
                "--dtype",
                "f32",
                "f64",
                "--format",
                "json",
                "--seed",
                "--dims",
                "--backend",
            ],
        ),
        ("ir", &["FILE", "--loss", "--params", "--set"]),
    ];
    for (sub, flags) in cases {
        for help in [vec![*sub, "--help"], vec!["help", *sub]] {
            let out = lossc(&help);
            out.expect(0, &[]);
            for flag in *flags {
                assert!(
                    out.stdout.contains(flag),
                    "`{}` lacks {flag}\n{}",
                    help.join(" "),
                    out.show()
                );
            }
        }
    }
    lossc(["--version"]).expect(0, &[]);
}

// ---------------------------------------------------------------------------
// Parameters and loss names: exit 1 with a coded diagnostic
// ---------------------------------------------------------------------------

#[test]
fn unknown_parameter_is_named_with_the_valid_ones() {
    lossc(["run", "--loss", "TripletLoss", "--set", "margin=1"])
        .expect(
            1,
            &["LC0301", "`margin`", "distance_metric", "triplet_margin"],
        )
        .no_stdout();
    // The same check through --params and through `ir`.
    lossc(["ir", "--loss", "TripletLoss", "--params", r#"{"margn": 1}"#])
        .expect(1, &["LC0301", "`margn`", "triplet_margin"])
        .no_stdout();
}

#[test]
fn ill_typed_parameter_names_the_parameter() {
    lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--set",
        r#"scale="abc""#,
    ])
    .expect(1, &["LC0302", "`scale`", "float"])
    .no_stdout();
    // A non-JSON value is taken as a string, and is just as wrong.
    lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--set",
        "scale=abc",
    ])
    .expect(1, &["LC0302", "`scale`"])
    .no_stdout();
}

#[test]
fn bad_enum_choice_lists_the_choices() {
    lossc([
        "run",
        "--loss",
        "TripletLoss",
        "--set",
        "distance_metric=dot",
    ])
    .expect(
        1,
        &["distance_metric", "dot", "euclidean", "cosine", "manhattan"],
    )
    .no_stdout();
    lossc([
        "run",
        "--loss",
        "ContrastiveLoss",
        "--set",
        "distance_metric=cosine",
    ])
    .expect(1, &["euclidean", "manhattan", "cosine_distance"])
    .no_stdout();
}

#[test]
fn failing_require_reports_its_message() {
    lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--set",
        "scale=0",
    ])
    .expect(1, &["LC0305", "scale must be > 0"])
    .no_stdout();
    lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--set",
        r#"directions=["query_to_doc","doc_to_doc"]"#,
        "--set",
        "partition_mode=per_direction",
    ])
    .expect(1, &["LC0305", "per_direction"])
    .no_stdout();
}

#[test]
fn unknown_loss_suggests_the_closest_name() {
    lossc(["run", "--loss", "MultipleNegativeRankingLoss"])
        .expect(
            1,
            &[
                "LC0401",
                "MultipleNegativeRankingLoss",
                "did you mean `MultipleNegativesRankingLoss`",
            ],
        )
        .no_stdout();
    lossc(["ir", "--loss", "TripletLos"])
        .expect(1, &["LC0401", "did you mean `TripletLoss`"])
        .no_stdout();
}

#[test]
fn a_file_with_several_losses_needs_a_name() {
    let s = Scratch::new("several_losses");
    let file = s.write(
        "two.loss",
        "loss First() {\n    input x: [B]\n    sum(i) x[i]\n}\n\n\
         loss Second() {\n    input x: [B]\n    mean(i) x[i]\n}\n",
    );
    lossc(["run", p(&file)])
        .expect(1, &["LC0402", "First", "Second"])
        .no_stdout();
    let json = r#"{"x": [1.0, 2.0, 6.0]}"#;
    let inputs = s.write("x.json", json);
    let first = lossc(["run", p(&file), "--loss", "First", "--inputs", p(&inputs)]);
    first.expect(0, &[]);
    assert_eq!(first.text_loss("First"), 9.0, "{}", first.show());
    let second = lossc(["run", p(&file), "--loss", "Second", "--inputs", p(&inputs)]);
    second.expect(0, &[]);
    assert_eq!(second.text_loss("Second"), 3.0, "{}", second.show());
}

// ---------------------------------------------------------------------------
// Tensor files: exit 1, each message naming the tensor
// ---------------------------------------------------------------------------

/// Runs ContrastiveLoss (default parameters) on a tensor file.
fn contrastive_on(path: &Path) -> Out {
    lossc(["run", "--loss", "ContrastiveLoss", "--inputs", p(path)])
}

#[test]
fn valid_tensor_file_runs() {
    let s = Scratch::new("valid_tensor_file");
    let file = s.safetensors("ok.safetensors", &pair_inputs(3, 4));
    let out = contrastive_on(&file);
    out.expect(0, &[]);
    out.text_loss("ContrastiveLoss");
    assert!(out.stdout.contains("B=3 D=4"), "{}", out.show());
}

#[test]
fn missing_input_is_named_with_its_shape() {
    let s = Scratch::new("missing_input");
    let mut t = pair_inputs(3, 4);
    t.remove("sentence2");
    contrastive_on(&s.safetensors("t.safetensors", &t))
        .expect(1, &["LC0501", "`sentence2`", "[B, D]"])
        .no_stdout();
}

#[test]
fn extra_input_is_named_with_the_real_inputs() {
    let s = Scratch::new("extra_input");
    let mut t = pair_inputs(3, 4);
    t.insert(
        "sentence3".into(),
        HostTensor::f64(vec![3, 4], values(12, 2.0)),
    );
    contrastive_on(&s.safetensors("t.safetensors", &t))
        .expect(
            1,
            &["LC0502", "`sentence3`", "sentence1, sentence2, labels"],
        )
        .no_stdout();
}

#[test]
fn wrong_shape_names_the_tensor_and_the_expected_shape() {
    let s = Scratch::new("wrong_shape");
    let mut t = pair_inputs(3, 4);
    t.insert(
        "sentence2".into(),
        HostTensor::f64(vec![3, 5], values(15, 2.0)),
    );
    contrastive_on(&s.safetensors("t.safetensors", &t))
        .expect(
            1,
            &[
                "LC0503",
                "`sentence2`",
                "[3, 5]",
                "[B, D] = [3, 4]",
                "D = 4",
            ],
        )
        .no_stdout();
    let mut t = pair_inputs(3, 4);
    t.insert("labels".into(), HostTensor::f64(vec![2], vec![0.0, 1.0]));
    contrastive_on(&s.safetensors("u.safetensors", &t))
        .expect(1, &["LC0503", "`labels`", "[2]", "[B] = [3]", "B = 3"])
        .no_stdout();
}

#[test]
fn wrong_rank_names_the_tensor_and_both_ranks() {
    let s = Scratch::new("wrong_rank");
    let mut t = pair_inputs(3, 4);
    t.insert(
        "labels".into(),
        HostTensor::f64(vec![3, 1], vec![0.0, 1.0, 0.0]),
    );
    contrastive_on(&s.safetensors("t.safetensors", &t))
        .expect(1, &["LC0503", "`labels`", "rank 2", "rank 1", "[B]"])
        .no_stdout();
}

#[test]
fn float_tensor_for_an_int_input_is_a_dtype_error() {
    let s = Scratch::new("wrong_dtype");
    let loss = s.write("int_labels.loss", INT_LABELS_LOSS);
    let x = HostTensor::f64(vec![2, 3], values(6, 0.3));
    let bad = TensorMap::from([
        ("x".to_string(), x.clone()),
        (
            "labels".to_string(),
            HostTensor::f64(vec![2], vec![0.0, 1.0]),
        ),
    ]);
    lossc([
        "run",
        p(&loss),
        "--inputs",
        p(&s.safetensors("bad.safetensors", &bad)),
    ])
    .expect(1, &["LC0504", "`labels`", "int", "f64"])
    .no_stdout();
    // The same values as integers run.
    let good = TensorMap::from([
        ("x".to_string(), x),
        ("labels".to_string(), HostTensor::i64(vec![2], vec![0, 1])),
    ]);
    lossc([
        "run",
        p(&loss),
        "--inputs",
        p(&s.safetensors("good.safetensors", &good)),
    ])
    .expect(0, &[])
    .text_loss("IntLabels");
}

#[test]
fn non_finite_values_are_named_with_their_position() {
    let s = Scratch::new("non_finite");
    for (bad, shown) in [(f64::NAN, "NaN"), (f64::INFINITY, "inf")] {
        let mut t = pair_inputs(3, 4);
        let mut v = values(12, 0.1);
        v[6] = bad; // row 1, column 2
        t.insert("sentence1".into(), HostTensor::f64(vec![3, 4], v));
        contrastive_on(&s.safetensors("t.safetensors", &t))
            .expect(1, &["LC0505", "`sentence1`", shown, "[1, 2]"])
            .no_stdout();
    }
}

#[test]
fn int_index_out_of_range_is_a_runtime_error() {
    let s = Scratch::new("index_range");
    let loss = s.write(
        "gather.loss",
        "loss Gather() {\n    input x: [B, D]\n    input idx: int[B]\n    mean(i) x[idx[i], 0]\n}\n",
    );
    lossc(["check", p(&loss)]).expect(0, &[]);
    for (bad, shown) in [(5, "index 5"), (-1, "index -1")] {
        let t = TensorMap::from([
            ("x".to_string(), HostTensor::f64(vec![2, 3], values(6, 0.2))),
            ("idx".to_string(), HostTensor::i64(vec![2], vec![0, bad])),
        ]);
        lossc([
            "run",
            p(&loss),
            "--inputs",
            p(&s.safetensors("t.safetensors", &t)),
        ])
        .expect(1, &["LC0506", shown, "`x`", "size 2"])
        .no_stdout();
    }
}

#[test]
fn truncated_safetensors_file_is_a_file_error() {
    let s = Scratch::new("truncated");
    let file = s.safetensors("t.safetensors", &pair_inputs(3, 4));
    let bytes = std::fs::read(&file).unwrap();
    for keep in [bytes.len() - 9, 20, 5] {
        let cut = s.write("cut.safetensors", &bytes[..keep]);
        contrastive_on(&cut)
            .expect(1, &["LC0507", "cut.safetensors", "not a valid safetensors"])
            .no_stdout();
    }
}

#[test]
fn garbage_bytes_are_file_errors_in_every_format() {
    let s = Scratch::new("garbage");
    let garbage = b"\x00\x13this is not a tensor file\xff\xfe";
    for name in ["g.safetensors", "g.npz", "g.npy", "g.json"] {
        contrastive_on(&s.write(name, garbage))
            .expect(1, &["LC0507", name])
            .no_stdout();
    }
    // Well-formed JSON of the wrong structure names the tensor.
    let ragged = s.write(
        "ragged.json",
        r#"{"sentence1": [[1.0, 2.0], [3.0]], "sentence2": [[1.0, 0.0]], "labels": [1.0]}"#,
    );
    contrastive_on(&ragged)
        .expect(1, &["LC0507", "`sentence1`", "ragged"])
        .no_stdout();
}

#[test]
fn nonexistent_inputs_path_is_a_file_error() {
    contrastive_on(Path::new("/nonexistent/batch.safetensors"))
        .expect(1, &["LC0507", "/nonexistent/batch.safetensors"])
        .no_stdout();
}

#[test]
fn unsupported_extension_lists_the_supported_ones() {
    let s = Scratch::new("extension");
    let file = s.write("batch.pt", b"whatever");
    contrastive_on(&file)
        .expect(1, &["LC0507", "batch.pt", ".safetensors", ".npz", ".json"])
        .no_stdout();
}

/// A tensor in the explicit JSON form, keeping its dtype exactly.
fn json_tensor(t: &HostTensor) -> serde_json::Value {
    let (dtype, data) = match &t.data {
        TensorData::F64(v) => ("f64", serde_json::json!(v)),
        TensorData::F32(v) => ("f32", serde_json::json!(v)),
        TensorData::I64(v) => ("i64", serde_json::json!(v)),
        TensorData::Bool(v) => ("bool", serde_json::json!(v)),
    };
    serde_json::json!({"shape": t.shape, "data": data, "dtype": dtype})
}

fn write_npz(path: &Path, tensors: &TensorMap, compressed: bool) {
    use ndarray::{ArrayD, IxDyn};
    let file = std::fs::File::create(path).unwrap();
    let mut npz = if compressed {
        ndarray_npy::NpzWriter::new_compressed(file)
    } else {
        ndarray_npy::NpzWriter::new(file)
    };
    for (name, t) in tensors {
        let shape = IxDyn(&t.shape);
        match &t.data {
            TensorData::F64(v) => npz
                .add_array(
                    name.as_str(),
                    &ArrayD::from_shape_vec(shape, v.clone()).unwrap(),
                )
                .unwrap(),
            TensorData::I64(v) => npz
                .add_array(
                    name.as_str(),
                    &ArrayD::from_shape_vec(shape, v.clone()).unwrap(),
                )
                .unwrap(),
            other => panic!("no npz writer for {other:?} here"),
        }
    }
    npz.finish().unwrap();
}

#[test]
fn json_and_npz_inputs_give_the_safetensors_loss() {
    let s = Scratch::new("formats");
    // Int labels (ContrastiveLoss) and a variadic input given as columns
    // negative_1..negative_3 (MNRL).
    for id in [
        "contrastive_euclidean_m3_sum_b5_d12",
        "mnrl_3neg_cos_s20_b4_d8",
    ] {
        let case = std_case(id);
        let params = params_file(&s, "params.json", &case.params);
        let params_arg = format!("@{}", p(&params));
        let inputs = case_inputs(&case);
        // Bare names (`sentence1`) as well as prefixed ones (`input.sentence1`).
        let bare: TensorMap = inputs
            .iter()
            .map(|(k, t)| (k.trim_start_matches("input.").to_string(), t.clone()))
            .collect();
        let json: serde_json::Map<String, serde_json::Value> = inputs
            .iter()
            .map(|(k, t)| (k.clone(), json_tensor(t)))
            .collect();
        let files = [
            s.safetensors("in.safetensors", &inputs),
            s.safetensors("bare.safetensors", &bare),
            s.write("in.json", serde_json::Value::Object(json).to_string()),
            {
                let f = s.path("in.npz");
                write_npz(&f, &bare, false);
                f
            },
            {
                let f = s.path("zipped.npz");
                write_npz(&f, &inputs, true);
                f
            },
        ];
        // What lossc reads back must be what was written.
        for f in &files[2..] {
            let back = read_tensors(f).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(back.len(), inputs.len(), "{}", f.display());
        }
        let losses: Vec<f64> = files
            .iter()
            .map(|f| {
                let out = lossc([
                    "run",
                    "--loss",
                    &case.class,
                    "--params",
                    &params_arg,
                    "--inputs",
                    p(f),
                    "--format",
                    "json",
                ]);
                out.expect(0, &[]);
                out.json_loss()
            })
            .collect();
        for (f, l) in files.iter().zip(&losses) {
            assert_eq!(
                *l,
                losses[0],
                "{id}: {} gives {l}, safetensors {}",
                f.display(),
                losses[0]
            );
        }
        assert!(
            close(losses[0], case.loss, 1e-9),
            "{id}: {} vs {}",
            losses[0],
            case.loss
        );
    }
}

// ---------------------------------------------------------------------------
// Good paths
// ---------------------------------------------------------------------------

#[test]
fn check_of_the_standard_library_is_clean() {
    let count = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("losses"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "loss")
        })
        .count();
    let out = lossc(["check", "losses/"]);
    out.expect(
        0,
        &[&format!("checked {count} files: 0 errors, 0 warnings")],
    );
}

#[test]
fn every_standard_loss_runs_on_random_inputs_in_text_and_json() {
    for loss in STD_LOSSES {
        let text = lossc(["run", "--loss", loss]);
        text.expect(0, &[]);
        let value = text.text_loss(loss);
        assert!(
            text.stdout.contains("backend jit, f64") && text.stdout.contains("seed 0"),
            "{}",
            text.show()
        );

        let out = lossc(["run", "--loss", loss, "--format", "json"]);
        out.expect(0, &[]);
        let json = out.json();
        for key in ["loss", "grads", "backend", "dtype", "dims"] {
            assert!(
                json.get(key).is_some(),
                "JSON lacks `{key}`\n{}",
                out.show()
            );
        }
        assert_eq!(
            out.json_loss(),
            value,
            "text and JSON disagree\n{}",
            out.show()
        );
        assert!(json["grads"].is_object(), "{}", out.show());
        assert_eq!(json["backend"], "jit", "{}", out.show());
        assert_eq!(json["dtype"], "f64", "{}", out.show());
        assert_eq!(json["dims"]["B"], 8, "{}", out.show());
        assert_eq!(json["dims"]["D"], 16, "{}", out.show());
        // JSON output is one line, so scripts can read it line by line.
        assert_eq!(out.stdout.trim_end().lines().count(), 1, "{}", out.show());
    }
}

#[test]
fn seeds_are_reproducible_and_distinct() {
    for loss in STD_LOSSES {
        let run = |seed: &str| {
            let out = lossc(["run", "--loss", loss, "--seed", seed, "--format", "json"]);
            out.expect(0, &[]);
            out.json_loss()
        };
        let (a, b, c) = (run("7"), run("7"), run("8"));
        assert_eq!(a, b, "{loss}: seed 7 gave {a} then {b}");
        assert_ne!(a, c, "{loss}: seeds 7 and 8 both gave {a}");
    }
}

#[test]
fn dims_and_dtype_reach_the_run() {
    let out = lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--dims",
        "B=3,D=5,K=2",
        "--format",
        "json",
    ]);
    out.expect(0, &[]);
    let json = out.json();
    assert_eq!(
        json["dims"],
        serde_json::json!({"B": 3, "D": 5, "K": 2}),
        "{}",
        out.show()
    );
    let f64_loss = out.json_loss();

    let out32 = lossc([
        "run",
        "--loss",
        "MultipleNegativesRankingLoss",
        "--dims",
        "B=3,D=5,K=2",
        "--format",
        "json",
        "--dtype",
        "f32",
    ]);
    out32.expect(0, &[]);
    assert_eq!(out32.json()["dtype"], "f32", "{}", out32.show());
    assert!(close(out32.json_loss(), f64_loss, 1e-4), "{}", out32.show());
    assert!(lossc(["run", "--loss", "TripletLoss", "--dtype", "f32"])
        .expect(0, &[])
        .stdout
        .contains("f32"));
}

#[test]
fn oversized_random_dims_are_refused_not_a_crash() {
    for dims in ["B=4294967296,D=4294967296", "B=100000,D=100000"] {
        lossc(["run", "--loss", "TripletLoss", "--dims", dims])
            .expect(1, &["LC0503", "`anchor`", "too large"])
            .no_stdout();
    }
}

/// Every fixture case of the standard losses, run exactly as the manifest
/// describes it, in f64 (1e-9 relative) and f32 (1e-4).
#[test]
fn fixture_cases_through_the_cli_match_the_reference() {
    // Every manifest case (all 29 classes), exactly as the manifest describes
    // it: the class, its params as a file, its tensors as the input file.
    let s = Scratch::new("fixtures");
    let cases = manifest();
    assert_eq!(cases.len(), 129, "the development set has 129 cases");
    for class in STD_LOSSES {
        assert!(
            cases.iter().any(|c| c.class == *class),
            "no case for {class}"
        );
    }
    let jobs: Vec<(Case, PathBuf)> = cases
        .into_iter()
        .map(|c| {
            let params = params_file(&s, &format!("{}.params.json", c.id), &c.params);
            (c, params)
        })
        .collect();
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get().min(8));
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(threads))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut failures = Vec::new();
                    for (case, params) in chunk {
                        let params_arg = format!("@{}", p(params));
                        for (dtype, rtol) in [("f64", 1e-9), ("f32", 1e-4)] {
                            let grads_path =
                                params.with_extension(format!("{dtype}.grads.safetensors"));
                            let out = lossc([
                                "run",
                                "--loss",
                                &case.class,
                                "--params",
                                &params_arg,
                                "--inputs",
                                p(&case.file),
                                "--format",
                                "json",
                                "--dtype",
                                dtype,
                                "--grads-out",
                                p(&grads_path),
                            ]);
                            // In f64, every gradient the file stores comes back through --grads-out.
                            if dtype == "f64" && out.code == 0 {
                                let reference = read_tensors(&case.file).expect("fixture");
                                let written = read_tensors(&grads_path).expect("grads file");
                                let by_row = case.tags.iter().any(|t| t == "zero_vector");
                                for (key, want) in
                                    reference.iter().filter(|(k, _)| k.starts_with("grad."))
                                {
                                    match written.get(key) {
                                        Some(got)
                                            if grad_error(
                                                &got.to_f64_vec(),
                                                &want.to_f64_vec(),
                                                &want.shape,
                                                1e-9,
                                                by_row,
                                            ) <= 1.0 => {}
                                        Some(_) => failures.push(format!(
                                            "{}: {key} differs from the reference",
                                            case.id
                                        )),
                                        None => failures
                                            .push(format!("{}: --grads-out has no {key}", case.id)),
                                    }
                                }
                            }
                            if out.code != 0 {
                                failures.push(format!("{} ({dtype}):\n{}", case.id, out.show()));
                                continue;
                            }
                            let json = out.json();
                            let got = out.json_loss();
                            if !close(got, case.loss, rtol) {
                                failures.push(format!(
                                    "{} ({dtype}): {got} vs reference {} (rel {:.2e})",
                                    case.id,
                                    case.loss,
                                    (got - case.loss).abs() / case.loss.abs()
                                ));
                            }
                            if json["dtype"] != dtype {
                                failures.push(format!("{}: dtype {}", case.id, json["dtype"]));
                            }
                        }
                    }
                    failures
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("worker thread"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} fixture runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn check_reports_every_error_with_its_location() {
    let s = Scratch::new("check_errors");
    let file = s.write(
        "two_errors.loss",
        "loss A() {\n    input x: [B, D]\n    mean(i) x[i, 0] * undefined_name\n}\n\n\
         loss C() {\n    input y: [B]\n    sum(i) y[i] + nope(y[i])\n}\n",
    );
    let out = lossc(["check", p(&file)]);
    out.expect(
        1,
        &[
            &format!("{}:3:23", p(&file)),
            "`undefined_name`",
            &format!("{}:8:19", p(&file)),
            "`nope`",
            "LC0101",
            "checked 1 file: 2 errors",
        ],
    )
    .no_stdout();
}

#[test]
fn check_of_a_clean_file_prints_a_summary() {
    let s = Scratch::new("check_clean");
    let file = s.write("int_labels.loss", INT_LABELS_LOSS);
    lossc(["check", p(&file)]).expect(0, &["checked 1 file: 0 errors, 0 warnings"]);
}

#[test]
fn check_of_a_directory_finds_nested_files() {
    let s = Scratch::new("check_dir");
    std::fs::create_dir_all(s.path("sub/deeper")).unwrap();
    s.write("good.loss", INT_LABELS_LOSS);
    s.write(
        "sub/deeper/bad.loss",
        "loss Bad() {\n    input x: [B]\n    sum(i) x[j]\n}\n",
    );
    s.write("sub/notes.txt", "not a loss file, skipped");
    lossc(["check", p(&s.0)])
        .expect(1, &["bad.loss:3:", "checked 2 files: 1 error"])
        .no_stdout();
}

#[test]
fn syntax_errors_stop_run_and_ir_with_a_location() {
    let s = Scratch::new("syntax");
    let file = s.write(
        "broken.loss",
        "loss A() {\n    input x: [B]\n    let a = x[\n}\n",
    );
    for sub in ["run", "ir", "check"] {
        lossc([sub, p(&file)])
            // The unclosed `[` (line 3) is where the error is reported.
            .expect(
                1,
                &["LC0001", &format!("{}:3:14", p(&file)), "never closed"],
            )
            .no_stdout();
    }
}

#[test]
fn ir_prints_the_library_graph() {
    let params: lossc::Params = serde_json::from_str(r#"{"distance_metric": "cosine"}"#).unwrap();
    let graph = compile_std("TripletLoss", &params).unwrap();
    let raw = lossc::ir::print::print_graph(&graph);
    let out = lossc([
        "ir",
        "--loss",
        "TripletLoss",
        "--set",
        "distance_metric=cosine",
        "--no-opt",
    ]);
    out.expect(0, &[]);
    assert_eq!(out.stdout, raw, "{}", out.show());
    // By default `ir` prints the optimised graph.
    let want = lossc::ir::print::print_graph(&lossc::opt::optimize(&graph).0);
    let out = lossc([
        "ir",
        "--loss",
        "TripletLoss",
        "--set",
        "distance_metric=cosine",
    ]);
    out.expect(0, &[]);
    assert_eq!(out.stdout, want, "{}", out.show());
    assert!(out.stdout.starts_with("loss TripletLoss"), "{}", out.show());
    // --params and --set agree; --set wins over --params.
    let out2 = lossc([
        "ir",
        "--loss",
        "TripletLoss",
        "--params",
        r#"{"distance_metric": "manhattan"}"#,
        "--set",
        "distance_metric=cosine",
    ]);
    out2.expect(0, &[]);
    assert_eq!(out2.stdout, want, "{}", out2.show());
}

#[test]
fn bench_json_reports_every_repeat_compile_and_kernel_counts() {
    let params = r#"{"loss": "MultipleNegativesRankingLoss", "matryoshka_dims": [16, 8]}"#;
    let common = [
        "--loss",
        "MatryoshkaLoss",
        "--params",
        params,
        "--dims",
        "B=6,D=16",
    ];
    let mut args = vec!["bench"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&["--repeats", "3", "--warmup", "1", "--format", "json"]);
    let out = lossc(&args);
    out.expect(0, &[]);
    let json = out.json();
    let times: Vec<f64> = json["times_ms"]
        .as_array()
        .unwrap_or_else(|| panic!("no times_ms\n{}", out.show()))
        .iter()
        .map(|t| t.as_f64().expect("a time"))
        .collect();
    assert_eq!(times.len(), 3, "{}", out.show());
    let median = json["median_ms"].as_f64().expect("median_ms");
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(median, sorted[1], "{}", out.show());
    for key in ["first_call_ms", "compile_ms", "differentiate_ms"] {
        let v = json[key].as_f64().unwrap_or(-1.0);
        assert!(v > 0.0, "{key} = {v}\n{}", out.show());
    }
    // The widths' copies of each term share their native functions.
    let kernels = json["kernels"].as_u64().expect("kernels");
    let functions = json["functions"].as_u64().expect("functions");
    assert!(
        0 < functions && functions < kernels,
        "{kernels} kernels in {functions} functions\n{}",
        out.show()
    );
    // The loss timed is the loss `run` prints for the same seeded inputs.
    let mut args = vec!["run"];
    args.extend_from_slice(&common);
    args.extend_from_slice(&["--backend", "interp", "--format", "json"]);
    let want = lossc(&args).json_loss();
    let got = out.json_loss();
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "bench {got} vs run {want}"
    );
}
