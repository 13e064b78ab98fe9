//! The `lossc` command line: the only place that reads files, prints, and
//! decides exit codes (0 success, 1 diagnostics or runtime errors, 2 usage).

use clap::{Args, Parser, Subcommand, ValueEnum};
use lossc::elab::Program;
use lossc::syntax::{diag::render_all, Diagnostic, FileId};
use lossc::tensor_io::{self, TensorMap};
use lossc::{bind, interp, ir, Params};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Writes a line to stdout; a closed pipe (`lossc ... | head`) is not an error.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Writes to stdout, ignoring a closed pipe.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

#[derive(Parser)]
#[command(
    name = "lossc",
    version,
    about = "A compiler for loss functions: write a loss as a .loss file, check it, evaluate it.",
    long_about = "lossc reads loss functions written in index notation (.loss files), checks names and \
tensor shapes, and evaluates them. The standard library ships the sentence-transformers losses \
(`--loss MultipleNegativesRankingLoss`).\n\nExamples:\n  lossc check losses/\n  lossc run --loss MultipleNegativesRankingLoss\n  \
lossc run my_loss.loss --inputs batch.safetensors --dtype f32 --format json\n  lossc ir --loss TripletLoss --set distance_metric=cosine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check .loss files (or directories of them) for syntax, name, type and shape errors.
    ///
    /// Every loss is elaborated with its default parameters. Exit status: 0 when clean,
    /// 1 when there are diagnostics, 2 on usage errors.
    Check {
        /// Files or directories (searched recursively for *.loss).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
    /// Evaluate a loss and its gradients on tensors from a file, or on seeded random inputs.
    Run(RunArgs),
    /// Print the optimised graph IR of a loss for the given parameters.
    Ir(IrArgs),
    /// Print the optimised forward-plus-gradient program of a loss.
    ///
    /// Every gradient node can say which source expression it differentiates (--spans).
    Grad(GradArgs),
    /// Compare the symbolic gradient with central finite differences (f64).
    ///
    /// Checks several random directions per input, and every coordinate of small inputs.
    /// Prints the worst relative error per input; exits 1 above --tol. Points on a kink
    /// (ties, hinges at exactly zero) are detected and reported, not counted as errors.
    Gradcheck(GradcheckArgs),
    /// Time forward + gradient of a loss after warm-up, with memory figures.
    ///
    /// Prints times of every repeat, their median, the first call (compile + run), the
    /// compile time (with the jit: how many kernels, in how many native functions), the
    /// time taken to derive and optimise the gradient program (not part of the compile
    /// time), peak RSS and the RSS before the first call. Compare backends in one run;
    /// the numbers are for this machine only.
    Bench(BenchArgs),
    /// Print the CUDA C kernels the CUDA backend generates for a loss.
    ///
    /// The forward+gradient program of the loss, one `extern "C" __global__` kernel per node
    /// (elementwise nodes as grid-stride loops, reductions to a scalar as block reductions,
    /// contractions as tiled kernels, concat/slice/reshape as copy kernels), each preceded by
    /// the IR node it computes. Needs no GPU; with --ptx, NVRTC compiles it to PTX.
    ///
    /// Examples:
    ///   lossc cuda --loss MultipleNegativesRankingLoss
    ///   lossc cuda --loss CoSENTLoss --dtype f64
    ///   LOSSC_NVRTC=/path/to/libnvrtc.so.13 lossc cuda --loss TripletLoss --ptx --arch compute_90
    Cuda(CudaArgs),
    /// List the standard library: every loss with its inputs and parameters.
    List {
        /// `text` for the terminal, `markdown` for a table (losses/README.md is made with it).
        #[arg(long, value_enum, default_value_t = ListFormat::Text)]
        format: ListFormat,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Input tensors; without it, seeded random inputs sized by --dims.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,
    /// Dims of random inputs, e.g. B=256,D=768.
    #[arg(long, value_name = "NAME=SIZE,...")]
    dims: Option<String>,
    /// The backend to time.
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Precision (the peers are measured in float32).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    #[command(flatten)]
    exec: ExecArgs,
    /// Untimed runs before timing.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Also write the JSON result to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Write the gradients of the last run (safetensors, as `run --grads-out`).
    #[arg(long, value_name = "FILE")]
    grads_out: Option<PathBuf>,
    /// Seed for random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct CudaArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Precision the kernels compute in.
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    dtype: DTypeArg,
    /// Print the PTX NVRTC makes of the kernels instead of their CUDA C (needs libnvrtc:
    /// LOSSC_NVRTC=/path/to/libnvrtc.so, or a CUDA toolkit on LD_LIBRARY_PATH; no GPU).
    #[arg(long)]
    ptx: bool,
    /// The virtual architecture --ptx compiles for.
    #[arg(long, default_value = "compute_90", value_name = "compute_XY")]
    arch: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ListFormat {
    Text,
    Markdown,
}

#[derive(Args)]
struct IrArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Print the IR as elaborated, before optimisation.
    #[arg(long)]
    no_opt: bool,
    /// List the optimisation rules that fired, and how often (on stderr).
    #[arg(long)]
    explain: bool,
}

#[derive(Args)]
struct GradArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Show, after each node, the source span it comes from.
    #[arg(long)]
    spans: bool,
    /// List the optimisation rules that fired, and how often (on stderr).
    #[arg(long)]
    explain: bool,
}

#[derive(Args)]
struct GradcheckArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Input tensors (as for `run`); without it, seeded random inputs.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,
    /// Seed for random inputs and random directions.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dims of random inputs, e.g. B=4,D=8.
    #[arg(long, value_name = "NAME=SIZE,...")]
    dims: Option<String>,
    /// Largest accepted error, relative to max(|analytic|, |numeric|, 1e-3 * |gradient|).
    #[arg(long, default_value_t = 1e-5)]
    tol: f64,
    /// Random directions per input.
    #[arg(long, default_value_t = 6)]
    directions: usize,
}

#[derive(Args, Clone)]
struct LossArgs {
    /// A .loss file. Without it, --loss names a standard-library loss.
    #[arg(value_name = "FILE")]
    file: Option<PathBuf>,
    /// The loss to use: a sentence-transformers class name (e.g. MultipleNegativesRankingLoss),
    /// or, with FILE, one of the losses the file defines.
    #[arg(long, value_name = "NAME")]
    loss: Option<String>,
    /// Parameters as a JSON object, or @FILE.json (e.g. a fixture manifest's `params`).
    #[arg(long, value_name = "JSON|@FILE")]
    params: Option<String>,
    /// Override one parameter: KEY=VALUE, VALUE parsed as JSON when it is JSON, else as a string.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    loss: LossArgs,
    /// Input tensors: .safetensors (keys `input.<name>` or `<name>`), .npz, .npy or .json.
    /// Without it, lossc draws seeded random inputs of small dims.
    #[arg(long, value_name = "FILE")]
    inputs: Option<PathBuf>,
    /// The backend that evaluates the loss: native code (falls back to the interpreter,
    /// with a note, on a machine Cranelift does not support), or the reference interpreter.
    #[arg(long, value_enum, default_value_t = Backend::Jit)]
    backend: Backend,
    /// Floating-point precision of the evaluation.
    #[arg(long, value_enum, default_value_t = DTypeArg::F64)]
    dtype: DTypeArg,
    #[command(flatten)]
    exec: ExecArgs,
    /// Write the gradients as safetensors, keys `grad.<input>` (variadic inputs by column,
    /// e.g. `grad.negative_2`), in the evaluated dtype. Written atomically.
    #[arg(long, value_name = "FILE")]
    grads_out: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Seed for random inputs (used without --inputs).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dims of random inputs, e.g. B=32,D=64 (used without --inputs).
    #[arg(long, value_name = "NAME=SIZE,...")]
    dims: Option<String>,
}

/// More threads than any machine lossc runs on has cores, by far.
const MAX_THREADS: usize = 1024;

/// How the JIT and CUDA run (the interpreter ignores these).
#[derive(Args)]
struct ExecArgs {
    /// Threads for the JIT's loop nests and its GEMM [default: every core].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Compute in-batch matrices (scores [B, N] and their gradients) in blocks of rows
    /// instead of materialising them: `auto` streams a matrix of 32 MiB or more
    /// (256 MiB on CUDA), `always` every matrix that can stream, `never` none.
    #[arg(long, value_enum, default_value_t = StreamArg::Auto)]
    stream: StreamArg,
    /// Rows per streamed block [default: about 32 MiB of tiles (256 MiB on CUDA), at least 256 rows; a Cached loss's mini_batch_size].
    #[arg(long, value_name = "ROWS")]
    tile_rows: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum StreamArg {
    Auto,
    Always,
    Never,
}

impl ExecArgs {
    fn options(&self) -> Result<lossc::jit::RunOptions, Failure> {
        if self.threads == Some(0) || self.tile_rows == Some(0) {
            return Err(Failure::Usage(
                "--threads and --tile-rows must be at least 1".into(),
            ));
        }
        if self.threads.is_some_and(|n| n > MAX_THREADS) {
            return Err(Failure::Usage(format!(
                "--threads must be at most {MAX_THREADS}"
            )));
        }
        let mut opts = lossc::jit::RunOptions::lean();
        if let Some(n) = self.threads {
            opts.threads = n;
        }
        opts.streaming = match self.stream {
            StreamArg::Auto => lossc::jit::Streaming::Auto,
            StreamArg::Always => lossc::jit::Streaming::Always,
            StreamArg::Never => lossc::jit::Streaming::Never,
        };
        opts.tile_rows = self.tile_rows;
        Ok(opts)
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Backend {
    /// The reference interpreter (ndarray).
    Interp,
    /// Native code compiled with Cranelift, one function per comprehension.
    Jit,
    /// CUDA kernels compiled with NVRTC, on GPU 0 (needs an NVIDIA driver).
    Cuda,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum DTypeArg {
    F32,
    F64,
    /// Float inputs stored as bfloat16 on the device, everything computed and returned
    /// in f32 (--backend cuda only).
    Bf16,
}

impl DTypeArg {
    fn name(self) -> &'static str {
        match self {
            DTypeArg::F32 => "f32",
            DTypeArg::F64 => "f64",
            DTypeArg::Bf16 => "bf16",
        }
    }

    /// The precision kernels compute in.
    fn precision(self) -> lossc::jit::Precision {
        match self {
            DTypeArg::F64 => lossc::jit::Precision::F64,
            DTypeArg::F32 | DTypeArg::Bf16 => lossc::jit::Precision::F32,
        }
    }

    /// How the CUDA backend stores float inputs.
    fn cuda_inputs(self) -> lossc::cuda::Inputs {
        match self {
            DTypeArg::Bf16 => lossc::cuda::Inputs::Bf16,
            _ => lossc::cuda::Inputs::Native,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
}

/// How a command failed.
enum Failure {
    /// Diagnostics already rendered to stderr: exit 1.
    Diagnostics,
    /// A usage problem (bad flag value, unreadable path): exit 2.
    Usage(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { paths } => check(&paths),
        Command::Run(args) => run(&args),
        Command::Ir(args) => print_ir(&args),
        Command::Grad(args) => print_grad(&args),
        Command::Gradcheck(args) => gradcheck(&args),
        Command::Bench(args) => bench(&args),
        Command::Cuda(args) => print_cuda(&args),
        Command::List { format } => {
            list(format);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Diagnostics) => ExitCode::from(1),
        Err(Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}

fn read_source(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

fn load(program: &mut Program, path: &Path) -> Result<FileId, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Usage(format!("cannot read `{}`: {e}", path.display())))?;
    let dir = path.parent().map(Path::to_path_buf);
    Ok(program.add_file(&path.display().to_string(), dir, &text, &read_source))
}

fn report(program: &Program, diags: &[Diagnostic]) {
    if !diags.is_empty() {
        eprint!("{}", render_all(diags, &program.sources));
    }
}

fn check(paths: &[PathBuf]) -> Result<(), Failure> {
    let mut files = Vec::new();
    for p in paths {
        collect_loss_files(p, &mut files)?;
    }
    if files.is_empty() {
        return Err(Failure::Usage(
            "no .loss files found in the given paths".into(),
        ));
    }
    let mut program = Program::new();
    let mut errors = 0;
    let mut warnings = 0;
    for f in &files {
        let id = load(&mut program, f)?;
        let diags = lossc::check_file(&program, id);
        errors += diags.iter().filter(|d| d.is_error()).count();
        warnings += diags.iter().filter(|d| !d.is_error()).count();
        report(&program, &diags);
    }
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    eprintln!(
        "checked {} file{}: {errors} error{}, {warnings} warning{}",
        files.len(),
        plural(files.len()),
        plural(errors),
        plural(warnings)
    );
    if errors > 0 {
        Err(Failure::Diagnostics)
    } else {
        Ok(())
    }
}

fn collect_loss_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), Failure> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Failure::Usage(format!("cannot read `{}`: {e}", path.display())))?;
    if meta.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| Failure::Usage(format!("cannot list `{}`: {e}", path.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            collect_loss_files(&e, out)?;
        } else if e.extension().is_some_and(|x| x == "loss") {
            out.push(e);
        }
    }
    Ok(())
}

/// Parses --params and --set into one JSON object.
fn parse_params(args: &LossArgs) -> Result<Params, Failure> {
    let mut params = match &args.params {
        None => Params::new(),
        Some(text) => {
            let (source, json) = match text.strip_prefix('@') {
                Some(path) => {
                    let t = std::fs::read_to_string(path).map_err(|e| {
                        Failure::Usage(format!("--params: cannot read `{path}`: {e}"))
                    })?;
                    (format!("`{path}`"), t)
                }
                None => ("--params".to_string(), text.clone()),
            };
            match serde_json::from_str::<serde_json::Value>(&json) {
                Ok(serde_json::Value::Object(m)) => m,
                Ok(other) => {
                    return Err(Failure::Usage(format!(
                        "{source} must be a JSON object like {{\"scale\": 20}}, got {other}"
                    )))
                }
                Err(e) => return Err(Failure::Usage(format!("{source} is not valid JSON: {e}"))),
            }
        }
    };
    for kv in &args.set {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(Failure::Usage(format!(
                "--set expects KEY=VALUE, got `{kv}`"
            )));
        };
        let value =
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        params.insert(k.trim().to_string(), value);
    }
    Ok(params)
}

/// Loads the program, picks the loss and compiles it.
fn compile(args: &LossArgs, spec: &lossc::Specialize) -> Result<(Program, ir::Graph), Failure> {
    let params = parse_params(args)?;
    let mut program = Program::new();
    let file = match &args.file {
        Some(p) => Some(load(&mut program, p)?),
        None => None,
    };
    if file.is_none() && args.loss.is_none() {
        return Err(Failure::Usage(
            "give a .loss FILE or --loss NAME (e.g. --loss MultipleNegativesRankingLoss)".into(),
        ));
    }
    let load_errors = program.load_errors(file);
    if !load_errors.is_empty() {
        report(&program, &load_errors);
        return Err(Failure::Diagnostics);
    }
    let (fid, decl) = match lossc::select_loss(&program, file, args.loss.as_deref()) {
        Ok(x) => x,
        Err(d) => {
            report(&program, &[d]);
            return Err(Failure::Diagnostics);
        }
    };
    match lossc::compile_for(&program, fid, decl, &params, spec) {
        Ok(g) => Ok((program, g)),
        Err(diags) => {
            report(&program, &diags);
            Err(Failure::Diagnostics)
        }
    }
}

fn print_ir(args: &IrArgs) -> Result<(), Failure> {
    let (_, graph) = compile(&args.loss, &lossc::Specialize::default())?;
    if args.no_opt {
        out!("{}", ir::print::print_graph(&graph));
        return Ok(());
    }
    let (graph, report) = lossc::opt::optimize(&graph);
    out!("{}", ir::print::print_graph(&graph));
    if args.explain {
        explain(&report);
    }
    Ok(())
}

fn print_cuda(args: &CudaArgs) -> Result<(), Failure> {
    let (program, graph) = compile(&args.loss, &lossc::Specialize::default())?;
    let (full, _) = lossc::differentiate(&graph);
    let source = lossc::cuda::source_with(&full, args.dtype.precision(), args.dtype.cuda_inputs())
        .map_err(|e| {
            eprintln!(
                "error: internal error: CUDA code generation failed for `{}`: {e}",
                graph.name
            );
            Failure::Diagnostics
        })?;
    if args.ptx {
        let ptx = lossc::cuda::nvrtc::compile(&source.text, &args.arch).map_err(|e| {
            report(
                &program,
                &[Diagnostic::error(
                    lossc::syntax::codes::BACKEND_UNAVAILABLE,
                    e,
                )],
            );
            Failure::Diagnostics
        })?;
        out!("{ptx}");
    } else {
        out!("{}", source.text);
    }
    eprintln!(
        "{}: {} kernels for {} nodes ({}), {} runtime dims",
        graph.name,
        source.kernels.len(),
        full.nodes.len(),
        args.dtype.name(),
        source.dims.len()
    );
    Ok(())
}

fn explain(report: &lossc::opt::Report) {
    eprintln!("rules fired:");
    for line in report.lines() {
        eprintln!("  {line}");
    }
}

fn print_grad(args: &GradArgs) -> Result<(), Failure> {
    let (program, graph) = compile(&args.loss, &lossc::Specialize::default())?;
    let (full, report) = lossc::differentiate(&graph);
    let annotate = |_: ir::NodeId, node: &ir::Node| -> Option<String> {
        if !args.spans {
            return None;
        }
        let span = node.span?;
        let (line, col) = program.sources.line_col(span.file, span.start);
        let text: String = program
            .sources
            .snippet(span)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let short: String = text.chars().take(48).collect();
        let dots = if text.chars().count() > 48 { "…" } else { "" };
        Some(format!(
            "{}:{line}:{col} `{short}{dots}`",
            program.sources.get(span.file).name
        ))
    };
    out!("{}", ir::print::print_graph_annotated(&full, &annotate));
    eprintln!(
        "{} nodes: forward {}, forward + gradient {}",
        graph.name,
        lossc::opt::optimize(&graph).0.nodes.len(),
        full.nodes.len()
    );
    if args.explain {
        explain(&report);
    }
    Ok(())
}

/// The tensors of --inputs, read before compiling (their shapes specialise the loss).
fn read_inputs(
    inputs: &Option<PathBuf>,
    dims: &Option<String>,
) -> Result<Option<TensorMap>, Failure> {
    let Some(path) = inputs else { return Ok(None) };
    if !parse_dims(dims)?.is_empty() {
        return Err(Failure::Usage(
            "--dims sizes random inputs; the shapes of --inputs come from the file".into(),
        ));
    }
    tensor_io::read_tensors(path).map(Some).map_err(|e| {
        report(
            &Program::default(),
            &[Diagnostic::error(
                lossc::syntax::codes::TENSOR_FILE,
                e.to_string(),
            )],
        );
        Failure::Diagnostics
    })
}

/// Compiles the loss for its tensors (read from --inputs, or drawn at random
/// after compiling, sized by --dims) and returns both.
fn prepare(
    loss: &LossArgs,
    inputs: &Option<PathBuf>,
    dims: &Option<String>,
    seed: u64,
) -> Result<(Program, ir::Graph, TensorMap), Failure> {
    let file_tensors = read_inputs(inputs, dims)?;
    let spec = lossc::Specialize {
        tensors: file_tensors.as_ref(),
        seed,
        dims: parse_dims(dims)?,
    };
    let (program, graph) = compile(loss, &spec)?;
    let tensors = match file_tensors {
        Some(t) => t,
        None => random_tensors(&program, &graph, seed, dims)?,
    };
    Ok((program, graph, tensors))
}

/// A backend ready to evaluate one graph.
enum Engine {
    Interp,
    Jit(lossc::jit::JitProgram),
    Cuda(lossc::cuda::CudaProgram),
}

impl Engine {
    /// The backend that actually runs (the JIT may have fallen back).
    fn name(&self) -> &'static str {
        backend_name(match self {
            Engine::Interp => Backend::Interp,
            Engine::Jit(_) => Backend::Jit,
            Engine::Cuda(_) => Backend::Cuda,
        })
    }
}

/// Compiles the graph for a backend choice.
fn engine(
    program: &Program,
    backend: Backend,
    dtype: DTypeArg,
    full: &ir::Graph,
    name: &str,
) -> Result<Engine, Failure> {
    let precision = dtype.precision();
    if dtype == DTypeArg::Bf16 && backend != Backend::Cuda {
        return Err(Failure::Usage(
            "--dtype bf16 stores inputs as bfloat16 on the GPU: it needs --backend cuda \
             (the jit and the interpreter run f32 or f64)"
                .into(),
        ));
    }
    match backend {
        Backend::Interp => Ok(Engine::Interp),
        Backend::Jit => match lossc::jit::compile(full, precision) {
            Ok(p) => Ok(Engine::Jit(p)),
            Err(e) if e.starts_with(lossc::jit::UNSUPPORTED_MACHINE) => {
                eprintln!("note: {e}; using the interpreter (--backend interp)");
                Ok(Engine::Interp)
            }
            Err(e) => {
                eprintln!("error: internal error: the jit backend cannot compile `{name}`: {e}");
                Err(Failure::Diagnostics)
            }
        },
        Backend::Cuda => lossc::cuda::compile_with(full, precision, dtype.cuda_inputs())
            .map(Engine::Cuda)
            .map_err(|d| {
                report(program, &[d]);
                Failure::Diagnostics
            }),
    }
}

/// Seeded random inputs, sized by --dims and the defaults.
fn random_tensors(
    program: &Program,
    graph: &ir::Graph,
    seed: u64,
    dims: &Option<String>,
) -> Result<TensorMap, Failure> {
    let dims = parse_dims(dims)?;
    let known = graph.dim_names();
    if let Some(unknown) = dims.keys().find(|k| !known.contains(k)) {
        return Err(Failure::Usage(format!(
            "--dims: `{}` has no dim `{unknown}`; its dims are {}",
            graph.name,
            known.join(", ")
        )));
    }
    bind::random_inputs(graph, seed, &dims).map_err(|d| {
        report(program, &[d]);
        Failure::Diagnostics
    })
}

fn list(format: ListFormat) {
    let program = Program::new();
    let entries = lossc::library_catalogue(&program);
    if format == ListFormat::Markdown {
        outln!("| loss | what it is for | inputs | parameters (defaults) |");
        outln!("|---|---|---|---|");
        for e in &entries {
            let cell = |v: &[String]| {
                v.iter()
                    .map(|x| format!("`{x}`"))
                    .collect::<Vec<_>>()
                    .join("<br>")
                    .replace('|', "\\|")
            };
            outln!(
                "| {} | {} | {} | {} |",
                e.name,
                e.summary.replace('|', "\\|"),
                cell(&e.inputs),
                cell(&e.params)
            );
        }
        return;
    }
    for e in &entries {
        outln!("{}  ({})", e.name, e.file);
        outln!("  {}", e.summary);
        for i in &e.inputs {
            outln!("  input {i}");
        }
        for p in &e.params {
            outln!("  param {p}");
        }
    }
}

fn gradcheck(args: &GradcheckArgs) -> Result<(), Failure> {
    let (program, graph, tensors) = prepare(&args.loss, &args.inputs, &args.dims, args.seed)?;
    let (full, _) = lossc::differentiate(&graph);
    let opts = lossc::gradcheck::Options {
        directions: args.directions,
        seed: args.seed,
        ..Default::default()
    };
    let result = lossc::gradcheck::check(&graph, &full, &tensors, &opts).map_err(|d| {
        report(&program, &d);
        Failure::Diagnostics
    })?;
    outln!("{} = {} (f64)", graph.name, result.loss);
    if result.frozen_detach {
        outln!("detached terms are held at their values at this point (the gradient autograd computes)");
    }
    let mut failed = false;
    for r in &result.inputs {
        let verdict = if r.worst <= args.tol { "ok" } else { "FAILED" };
        failed |= r.worst > args.tol;
        let kinks = if r.kinks > 0 {
            format!(
                ", {} on a kink (one-sided derivatives differ; not compared)",
                r.kinks
            )
        } else {
            String::new()
        };
        outln!(
            "  {:<20} worst relative error {:.2e} over {} checks{kinks}  {verdict}",
            r.name,
            r.worst,
            r.checks
        );
    }
    if failed {
        eprintln!(
            "error: the symbolic gradient disagrees with finite differences above --tol {:e}",
            args.tol
        );
        return Err(Failure::Diagnostics);
    }
    Ok(())
}

fn parse_dims(spec: &Option<String>) -> Result<BTreeMap<String, i64>, Failure> {
    let mut dims = BTreeMap::new();
    let Some(spec) = spec else { return Ok(dims) };
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let parsed = part.split_once('=').and_then(|(k, v)| {
            v.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .map(|n| (k.trim().to_string(), n))
        });
        match parsed {
            Some((k, n)) => {
                dims.insert(k, n);
            }
            None => {
                return Err(Failure::Usage(format!(
                    "--dims expects NAME=SIZE,... with sizes >= 0, got `{part}`"
                )))
            }
        }
    }
    Ok(dims)
}

fn run(args: &RunArgs) -> Result<(), Failure> {
    let (program, graph, tensors) = prepare(&args.loss, &args.inputs, &args.dims, args.seed)?;
    let (full, _) = lossc::differentiate(&graph);
    let bound = bind::bind(&full, &tensors).map_err(|diags| {
        report(&program, &diags);
        Failure::Diagnostics
    })?;
    let fail = |d: Diagnostic| {
        report(&program, &[d]);
        Failure::Diagnostics
    };
    let opts = args.exec.options()?;
    let jit = engine(&program, args.backend, args.dtype, &full, &graph.name)?;
    let (outputs, grads): (Vec<(String, f64)>, Vec<(String, tensor_io::HostTensor)>) =
        match args.dtype {
            DTypeArg::F64 => {
                let e = evaluate::<f64>(&full, &bound, &jit, opts).map_err(fail)?;
                (
                    e.outputs.clone(),
                    lossc::gradient_tensors(&full, &bound, &e),
                )
            }
            DTypeArg::F32 | DTypeArg::Bf16 => {
                let e = evaluate::<f32>(&full, &bound, &jit, opts).map_err(fail)?;
                (
                    e.outputs
                        .iter()
                        .map(|(n, x)| (n.clone(), *x as f64))
                        .collect(),
                    lossc::gradient_tensors(&full, &bound, &e),
                )
            }
        };
    let loss = outputs[0].1;
    if !loss.is_finite() {
        report(
            &program,
            &[Diagnostic::error(lossc::syntax::codes::NON_FINITE, format!("the loss evaluated to {loss}"))
                .with_help("the inputs are finite, so an operation of the loss left its domain (log of a non-positive number, 0/0, ...); `lossc ir` shows the program")],
        );
        return Err(Failure::Diagnostics);
    }
    if let Some(path) = &args.grads_out {
        write_grads(&program, path, &grads)?;
    }
    let dtype = args.dtype.name();
    let l2 = |t: &tensor_io::HostTensor| t.to_f64_vec().iter().map(|x| x * x).sum::<f64>().sqrt();
    match args.format {
        Format::Json => {
            let components: serde_json::Map<String, serde_json::Value> = outputs[1..]
                .iter()
                .map(|(n, x)| (n.clone(), json_number(*x)))
                .collect();
            let grads_json: serde_json::Map<String, serde_json::Value> = grads
                .iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        serde_json::json!({"shape": t.shape, "l2": json_number(l2(t))}),
                    )
                })
                .collect();
            let out = serde_json::json!({
                "loss": json_number(loss),
                "grads": grads_json,
                "components": components,
                "backend": jit.name(),
                "dtype": dtype,
                "dims": bound.sizes,
            });
            outln!("{out}");
        }
        Format::Text => {
            outln!("{} = {loss}", graph.name);
            for (n, x) in &outputs[1..] {
                outln!("  {n} = {x}");
            }
            for (k, t) in &grads {
                outln!("  d/d {k:<16} shape {:?}  l2 {:.6e}", t.shape, l2(t));
            }
            let dims: Vec<String> = bound
                .sizes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let source = if args.inputs.is_some() {
                "inputs from file".to_string()
            } else {
                format!("random inputs, seed {}", args.seed)
            };
            outln!(
                "(backend {}, {dtype}, {}; {source})",
                jit.name(),
                dims.join(" ")
            );
        }
    }
    Ok(())
}

/// Evaluates on the chosen backend: the interpreter, or the JIT's code.
/// Writes gradients as safetensors (`grad.<name>`), atomically.
fn write_grads(
    program: &Program,
    path: &Path,
    grads: &[(String, tensor_io::HostTensor)],
) -> Result<(), Failure> {
    let map: TensorMap = grads
        .iter()
        .map(|(k, t)| (format!("grad.{k}"), t.clone()))
        .collect();
    tensor_io::write_safetensors(path, &map).map_err(|e| {
        report(
            program,
            &[Diagnostic::error(
                lossc::syntax::codes::TENSOR_FILE,
                e.to_string(),
            )],
        );
        Failure::Diagnostics
    })
}

/// Resident set size now and at its peak, in MiB (Linux /proc; 0 elsewhere).
fn rss_mb() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const MIB: f64 = (1 << 20) as f64;

fn bench(args: &BenchArgs) -> Result<(), Failure> {
    if args.repeats == 0 {
        return Err(Failure::Usage("--repeats must be at least 1".into()));
    }
    let opts = args.exec.options()?;
    let (program, graph, tensors) = prepare(&args.loss, &args.inputs, &args.dims, args.seed)?;
    let start = std::time::Instant::now();
    let (full, _) = lossc::differentiate(&graph);
    let differentiate_ms = start.elapsed().as_secs_f64() * 1e3;
    let mut bound = bind::bind(&full, &tensors).map_err(|diags| {
        report(&program, &diags);
        Failure::Diagnostics
    })?;
    drop(tensors);
    // Inputs held in the precision being timed, as a training loop (and the
    // peers' float32 tensors) hold them: a call converts nothing.
    for input in &mut bound.inputs {
        let t = std::mem::replace(
            &mut input.tensor,
            tensor_io::HostTensor::f64(vec![0], vec![]),
        );
        input.tensor = t.with_float_precision(args.dtype != DTypeArg::F64);
    }
    let fail = |d: Diagnostic| {
        report(&program, &[d]);
        Failure::Diagnostics
    };
    let (baseline_rss, _) = rss_mb();
    let start = std::time::Instant::now();
    let jit = engine(&program, args.backend, args.dtype, &full, &graph.name)?;
    let compile_ms = start.elapsed().as_secs_f64() * 1e3;
    // One timed call: forward + gradient, returning the loss and the gradients.
    let call = |jit: &Engine| -> Result<(f64, Vec<(String, tensor_io::HostTensor)>), Failure> {
        match args.dtype {
            DTypeArg::F64 => {
                let e = evaluate::<f64>(&full, &bound, jit, opts).map_err(fail)?;
                let loss = e.outputs[0].1;
                Ok((loss, lossc::into_gradient_tensors(&full, &bound, e)))
            }
            DTypeArg::F32 | DTypeArg::Bf16 => {
                let e = evaluate::<f32>(&full, &bound, jit, opts).map_err(fail)?;
                let loss = e.outputs[0].1 as f64;
                Ok((loss, lossc::into_gradient_tensors(&full, &bound, e)))
            }
        }
    };
    // What the backend streams at these sizes: one entry per pass over
    // blocks of rows.
    let ids =
        |v: &[ir::NodeId]| -> Vec<String> { v.iter().map(|id| format!("%{}", id.0)).collect() };
    let pass = |rows, tile_rows, streamed: &[ir::NodeId], members: &[ir::NodeId]| {
        serde_json::json!({
            "rows": rows,
            "tile_rows": tile_rows,
            "streamed": ids(streamed),
            "members": ids(members),
        })
    };
    let passes: Vec<serde_json::Value> = match &jit {
        Engine::Jit(program) => program
            .schedule(&bound, opts)
            .map_err(fail)?
            .iter()
            .map(|p| pass(p.rows, p.tile_rows, &p.streamed, &p.members))
            .collect(),
        Engine::Cuda(program) => program
            .schedule(&bound, opts)
            .map_err(fail)?
            .iter()
            .map(|p| {
                let members: Vec<ir::NodeId> = p.nodes.iter().map(|(id, _)| *id).collect();
                pass(p.rows, p.tile_rows, &p.streamed, &members)
            })
            .collect(),
        Engine::Interp => Vec::new(),
    };
    let (mut loss, mut grads) = call(&jit)?;
    let first_call_ms = start.elapsed().as_secs_f64() * 1e3;
    for _ in 0..args.warmup {
        drop(std::mem::take(&mut grads));
        (loss, grads) = call(&jit)?;
    }
    let mut times = Vec::with_capacity(args.repeats);
    for _ in 0..args.repeats {
        // Only one call's gradients alive at a time, as in a training step.
        drop(std::mem::take(&mut grads));
        let t = std::time::Instant::now();
        let (l, g) = call(&jit)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        (loss, grads) = (l, g);
    }
    let (_, peak_rss) = rss_mb();
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2.0
    };
    if let Some(path) = &args.grads_out {
        write_grads(&program, path, &grads)?;
    }
    let dtype = args.dtype.name();
    let mut json = serde_json::json!({
        "loss_name": graph.name,
        "loss": json_number(loss),
        "backend": jit.name(),
        "dtype": dtype,
        "dims": bound.sizes,
        "threads": if matches!(jit, Engine::Jit(_)) { opts.threads } else { 1 },
        "warmup": args.warmup,
        "times_ms": times,
        "median_ms": median,
        "first_call_ms": first_call_ms,
        "compile_ms": compile_ms,
        "differentiate_ms": differentiate_ms,
        "peak_rss_mb": peak_rss,
        "baseline_rss_mb": baseline_rss,
        "inputs_mb": bound.inputs.iter().map(|i| i.tensor.bytes()).sum::<usize>() as f64 / MIB,
        "gradients_mb": grads.iter().map(|(_, t)| t.bytes()).sum::<usize>() as f64 / MIB,
        "passes": passes,
    });
    if let Engine::Jit(program) = &jit {
        let (kernels, functions) = program.kernel_counts();
        json["kernels"] = serde_json::Value::from(kernels);
        json["functions"] = serde_json::Value::from(functions);
    }
    if let Engine::Cuda(program) = &jit {
        // Node buffers only (inputs included), freed as soon as they are dead.
        json["peak_device_mb"] = json_number(program.peak_device_bytes() as f64 / MIB);
        json["ptx_from_cache"] = serde_json::Value::Bool(program.from_cache());
        if let Ok(dev) = lossc::cuda::device() {
            json["device"] = serde_json::Value::String(dev.name.clone());
        }
    }
    if let Some(path) = &args.json_out {
        let text = format!("{json}\n");
        let tmp = path.with_extension("tmp-json");
        if std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(Failure::Usage(format!(
                "--json-out: cannot write `{}`",
                path.display()
            )));
        }
    }
    match args.format {
        Format::Json => outln!("{json}"),
        Format::Text => {
            let dims: Vec<String> = bound
                .sizes
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            outln!(
                "{} forward+gradient, {} {dtype}, {}",
                graph.name,
                jit.name(),
                dims.join(" ")
            );
            outln!(
                "  median {median:.3} ms over {} runs (after {} warm-up)",
                args.repeats,
                args.warmup
            );
            match &jit {
                Engine::Jit(program) => {
                    let (kernels, functions) = program.kernel_counts();
                    outln!(
                        "  first call {first_call_ms:.1} ms (compile {compile_ms:.1} ms: \
                         {kernels} kernels in {functions} functions)"
                    );
                }
                _ => outln!("  first call {first_call_ms:.1} ms (compile {compile_ms:.1} ms)"),
            }
            outln!("  gradient program derived and optimised in {differentiate_ms:.1} ms");
            outln!("  peak RSS {peak_rss:.0} MiB (before the first call {baseline_rss:.0} MiB)");
            if let Engine::Cuda(program) = &jit {
                outln!(
                    "  peak device memory of node buffers {:.1} MiB",
                    program.peak_device_bytes() as f64 / MIB
                );
            }
            outln!("  loss = {loss}");
        }
    }
    Ok(())
}

fn evaluate<F: interp::Real>(
    full: &ir::Graph,
    bound: &bind::Bound,
    engine: &Engine,
    opts: lossc::jit::RunOptions,
) -> Result<interp::Evaluation<F>, Diagnostic> {
    match engine {
        Engine::Jit(program) => program.run_with::<F>(bound, opts),
        // Only the loss, its components and the gradients are read here.
        Engine::Cuda(program) => program.run_with::<F>(bound, opts),
        Engine::Interp => interp::evaluate::<F>(full, bound),
    }
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Interp => "interp",
        Backend::Jit => "jit",
        Backend::Cuda => "cuda",
    }
}

/// JSON has no NaN or infinity; those are written as strings.
fn json_number(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or_else(
        || serde_json::Value::String(x.to_string()),
        serde_json::Value::Number,
    )
}
