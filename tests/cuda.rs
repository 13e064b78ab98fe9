//! The CUDA backend. On every machine: the generated CUDA C of every standard
//! loss is pinned by snapshots, NVRTC compiles every kernel to PTX for sm_90
//! (no GPU needed; skipped with a reason when libnvrtc cannot be loaded,
//! unless `LOSSC_REQUIRE_NVRTC=1`, which CI sets), and `--backend cuda`
//! without a driver is a clear error. On a machine with a GPU: every fixture
//! case of every library loss agrees with the interpreter (loss, components
//! and every gradient, f32, relative 1e-4), skipped with a reason elsewhere.
//!
//! Update the snapshots after an intended change with `INSTA_UPDATE=always
//! cargo test --test cuda`, and read the diff before committing it.

mod common;
use common::*;
use lossc::bind;
use lossc::cuda::{self, Inputs, Precision, RunOptions};
use std::process::Command;

/// The first fixture case of every class the library defines.
fn first_case_per_class() -> Vec<Case> {
    let program = lossc::elab::Program::new();
    let mut seen = std::collections::BTreeSet::new();
    manifest()
        .into_iter()
        .filter(|c| lossc::select_loss(&program, None, Some(&c.class)).is_ok())
        .filter(|c| seen.insert(c.class.clone()))
        .collect()
}

/// The forward+gradient program of a case's loss, specialised to its tensors.
fn full_graph(case: &Case) -> lossc::ir::Graph {
    let tensors = read_case(case);
    let graph = compile_std_for(&case.class, &case.params, &tensors)
        .unwrap_or_else(|e| panic!("{}: {e}", case.id));
    lossc::differentiate(&graph).0
}

fn nvrtc_or_skip(test: &str) -> bool {
    match cuda::nvrtc::load() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("LOSSC_REQUIRE_NVRTC").is_some_and(|v| v == "1") {
                panic!("{test}: LOSSC_REQUIRE_NVRTC=1 but NVRTC cannot be used: {e}");
            }
            eprintln!("SKIP {test}: {e}");
            false
        }
    }
}

#[test]
fn generated_cuda_source_of_every_standard_loss() {
    let cases = first_case_per_class();
    assert!(cases.len() >= 25, "only {} classes", cases.len());
    for case in cases {
        let full = full_graph(&case);
        let source =
            cuda::source(&full, Precision::F32).unwrap_or_else(|e| panic!("{}: {e}", case.class));
        // Every node that is not an input computed by exactly one kernel
        // (a group's kernel computes several siblings).
        let mut computed: Vec<_> = source
            .kernels
            .iter()
            .flat_map(|k| k.members.clone())
            .collect();
        computed.sort();
        let want: Vec<_> = (0..full.nodes.len())
            .map(|i| lossc::ir::NodeId(i as u32))
            .filter(|id| !matches!(full.node(*id).kind, lossc::ir::NodeKind::Input { .. }))
            .collect();
        assert_eq!(computed, want, "{}", case.class);
        insta::assert_snapshot!(format!("cuda_{}", case.class), source.text);
    }
}

/// The forward+gradient graph of `class`'s first fixture case.
fn first_case_graph(class: &str) -> lossc::ir::Graph {
    let case = first_case_per_class()
        .into_iter()
        .find(|c| c.class == class)
        .unwrap_or_else(|| panic!("no {class} case"));
    full_graph(&case)
}

#[test]
fn generation_is_deterministic_and_precision_specific() {
    let full = first_case_graph("MultipleNegativesRankingLoss");
    let a = cuda::source(&full, Precision::F32).unwrap();
    let b = cuda::source(&full, Precision::F32).unwrap();
    assert_eq!(a.text, b.text);
    let d = cuda::source(&full, Precision::F64).unwrap();
    assert!(a.text.contains("typedef float real;"));
    assert!(d.text.contains("typedef double real;"));
    // MNRL's scores are a contraction: a tiled kernel.
    assert!(a
        .kernels
        .iter()
        .any(|k| matches!(k.launch, cuda::codegen::Launch::Tiled { .. })));
    // Its loss is a mean to a scalar: a block reduction.
    assert!(a
        .kernels
        .iter()
        .any(|k| matches!(k.launch, cuda::codegen::Launch::Scalar { .. })));
}

#[test]
fn every_kernel_of_every_standard_loss_compiles_to_ptx_for_sm_90() {
    if !nvrtc_or_skip("NVRTC compile of every standard loss") {
        return;
    }
    let start = std::time::Instant::now();
    let cases = first_case_per_class();
    // Two threads: NVRTC is the slow part and CI has two cores.
    let failures = std::sync::Mutex::new(Vec::new());
    let kernels = std::sync::atomic::AtomicUsize::new(0);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(case) = cases.get(i) else { break };
                let full = full_graph(case);
                // f32 for every loss, f64 too for the first, bf16 inputs
                // for every third and MNRL (a concat and contractions of
                // inputs).
                let mut variants = vec![(Precision::F32, Inputs::Native)];
                if i == 0 {
                    variants.push((Precision::F64, Inputs::Native));
                }
                if i % 3 == 0 || case.class == "MultipleNegativesRankingLoss" {
                    variants.push((Precision::F32, Inputs::Bf16));
                }
                for (p, inputs) in &variants {
                    let source = cuda::source_with(&full, *p, *inputs).unwrap();
                    let p = if *inputs == Inputs::Bf16 {
                        "bf16"
                    } else {
                        p.name()
                    };
                    match cuda::nvrtc::compile(&source.text, "compute_90") {
                        Ok(ptx) => {
                            for k in &source.kernels {
                                if !ptx.contains(&format!(".entry {}(", k.name)) {
                                    failures.lock().unwrap().push(format!(
                                        "{} {p}: no entry {} in the PTX",
                                        case.class, k.name
                                    ));
                                }
                            }
                            kernels.fetch_add(
                                source.kernels.len(),
                                std::sync::atomic::Ordering::SeqCst,
                            );
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {p}: {e}", case.class)),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    eprintln!(
        "nvrtc: {} kernels of {} losses compiled for compute_90 in {:.1} s",
        kernels.into_inner(),
        cases.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn nvrtc_reports_a_compile_error() {
    if !nvrtc_or_skip("NVRTC compile error") {
        return;
    }
    let err = cuda::nvrtc::compile(
        "extern \"C\" __global__ void k() { undeclared = 1; }",
        "compute_90",
    )
    .unwrap_err();
    assert!(err.contains("undeclared"), "{err}");
}

#[test]
fn ptx_cache_key_depends_on_source_options_and_version() {
    let k = |s: &str, o: &str, v: (u32, u32)| cuda::nvrtc::cache_key(s, &[o.to_string()], v);
    let base = k("a", "x", (13, 0));
    assert_eq!(base, k("a", "x", (13, 0)));
    assert_ne!(base, k("b", "x", (13, 0)));
    assert_ne!(base, k("a", "y", (13, 0)));
    assert_ne!(base, k("a", "x", (13, 1)));
    assert_eq!(base.len(), 32);
}

/// Relative agreement as the issue states it: |a - b| <= rtol * max(|a|, |b|, floor).
fn agree(a: f64, b: f64, rtol: f64, scale: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rtol * a.abs().max(b.abs()).max(1e-3 * scale).max(1e-30)
}

#[test]
fn gpu_every_fixture_case_agrees_with_the_interpreter() {
    if let Err(d) = cuda::device() {
        eprintln!("SKIP GPU agreement tests: {} ({})", d.message, d.code);
        return;
    }
    let program = lossc::elab::Program::new();
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in manifest() {
        if lossc::select_loss(&program, None, Some(&case.class)).is_err() {
            continue;
        }
        let tensors = read_case(&case);
        let Ok(graph) = compile_std_for(&case.class, &case.params, &tensors) else {
            continue;
        };
        let full = lossc::differentiate(&graph).0;
        let bound = match bind::bind(&full, &tensors) {
            Ok(b) => b,
            Err(d) => {
                failures.push(format!("{}: bind: {}", case.id, d[0].message));
                continue;
            }
        };
        let gpu = match cuda::compile(&full, Precision::F32) {
            Ok(p) => p,
            Err(d) => {
                failures.push(format!("{}: compile: {}", case.id, d.message));
                continue;
            }
        };
        ran += 1;
        let want = lossc::interp::evaluate::<f32>(&full, &bound);
        let got = gpu.run::<f32>(&bound);
        let (want, got) = match (want, got) {
            (Ok(w), Ok(g)) => (w, g),
            (Err(w), Err(g)) if w.code == g.code => continue,
            (w, g) => {
                failures.push(format!(
                    "{}: interp {:?} vs cuda {:?}",
                    case.id,
                    w.err().map(|d| d.message),
                    g.err().map(|d| d.message)
                ));
                continue;
            }
        };
        if let Err(e) = check_outputs(&full, &bound, &want, &got, 1e-4) {
            failures.push(format!("{}: {e}", case.id));
        }
        // The output-only run gives the same loss and gradients.
        let outputs_only = gpu.run_outputs::<f32>(&bound).expect("second run");
        if outputs_only.outputs[0].1 != got.outputs[0].1 {
            failures.push(format!("{}: run_outputs differs from run", case.id));
        }
        // Streamed in 2-row blocks, every in-batch matrix as tiles.
        match gpu.run_with::<f32>(&bound, lean(cuda::Streaming::Always, Some(2))) {
            Ok(streamed) => {
                if let Err(e) = check_outputs(&full, &bound, &want, &streamed, 1e-4) {
                    failures.push(format!("{} streamed: {e}", case.id));
                }
            }
            Err(d) => failures.push(format!("{} streamed: {}", case.id, d.message)),
        }
    }
    eprintln!("cuda: {ran} fixture cases ran on the GPU (whole, lean, streamed)");
    assert!(ran > 0);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gpu_out_of_range_label_is_a_diagnostic() {
    if let Err(d) = cuda::device() {
        eprintln!("SKIP GPU diagnostics test: {}", d.message);
        return;
    }
    let src =
        "loss L() {\n input x: [N]\n input idx: int[M]\n let y[m] = x[idx[m]]\n sum(m) y[m]\n}\n";
    let graph = compile_src(src, None, &lossc::Params::new()).unwrap();
    let tensors = tensors_of(r#"{"x": [1.0, 2.0], "idx": [0, 5]}"#);
    let bound = bind::bind(&graph, &tensors).unwrap();
    let gpu = cuda::compile(&graph, Precision::F32).unwrap();
    let err = gpu.run::<f32>(&bound).err().expect("an error");
    assert_eq!(err.code, "LC0506", "{}", err.message);
    assert!(err.message.contains("index 5"), "{}", err.message);
}

fn lossc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lossc"))
}

#[test]
fn cli_run_backend_cuda_without_a_driver_is_a_clear_error() {
    let out = lossc()
        .args([
            "run",
            "--loss",
            "CoSENTLoss",
            "--backend",
            "cuda",
            "--dtype",
            "f32",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    if cuda::device().is_ok() {
        assert!(out.status.success(), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("backend cuda"));
        return;
    }
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("LC0601"), "{stderr}");
    assert!(
        stderr.contains("no CUDA driver found") || stderr.contains("no usable CUDA device"),
        "{stderr}"
    );
    // bench says the same.
    let out = lossc()
        .args([
            "bench",
            "--loss",
            "CoSENTLoss",
            "--backend",
            "cuda",
            "--repeats",
            "1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("LC0601"), "{stderr}");
}

#[test]
fn cli_cuda_prints_the_kernels() {
    let out = lossc()
        .args(["cuda", "--loss", "MultipleNegativesRankingLoss"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("typedef float real;"), "{text}");
    assert!(
        text.contains("extern \"C\" __global__ void lossc_n"),
        "{text}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kernels for"), "{stderr}");
    let f64_out = lossc()
        .args(["cuda", "--loss", "CoSENTLoss", "--dtype", "f64"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&f64_out.stdout).contains("typedef double real;"));
    let help = lossc().args(["cuda", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--loss", "--params", "--dtype", "--ptx", "--arch", "Examples",
    ] {
        assert!(help.contains(flag), "cuda --help lacks {flag}\n{help}");
    }
    let bad = lossc()
        .args(["cuda", "--loss", "NoSuchLoss"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    // bf16 inputs: the kernels widen them as they read; the other backends
    // refuse the option with a usage error.
    let mnrl_bf16 = |command: &str| {
        lossc()
            .args([
                command,
                "--loss",
                "MultipleNegativesRankingLoss",
                "--dtype",
                "bf16",
            ])
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&mnrl_bf16("cuda").stdout).into_owned();
    assert!(
        text.contains("lossc_bf16(((const unsigned short*)bufs[0])"),
        "{text}"
    );
    let refused = mnrl_bf16("run");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("--dtype bf16") && stderr.contains("--backend cuda"),
        "{stderr}"
    );
}

/// The generated kernels compiled for the CPU (`tests/cuda_emu/shim.h`) and
/// run through the backend's own host logic (`cuda::execute_on`): checks the
/// kernels' semantics and the runtime (pointer table, dim table, proofs,
/// error word, freeing dead buffers) on machines without a GPU.
mod emu {
    use lossc::cuda::codegen::{Launch, Source, TILE};
    use lossc::cuda::Machine;
    use lossc::syntax::Diagnostic;
    use std::path::PathBuf;

    type KernelFn = unsafe extern "C" fn(*const u64, *const i64, *mut i64);

    pub struct Emu {
        kernels: Vec<KernelFn>,
        begin: unsafe extern "C" fn(u32),
        end: unsafe extern "C" fn(),
        thread: unsafe extern "C" fn(u32, u32, u32, u32, u32, u32),
        _lib: libloading::Library,
        /// Bytes uploaded so far (inputs and the dim table).
        pub uploaded: std::sync::atomic::AtomicUsize,
    }

    fn shim() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu/shim.h")
    }

    /// `None` when no host C++ compiler can be run (the reason is returned).
    pub fn available() -> Result<(), String> {
        match std::process::Command::new("g++").arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            _ => Err("no host C++ compiler (g++) to emulate the kernels with".into()),
        }
    }

    impl Emu {
        pub fn compile(source: &Source, tag: &str) -> Result<Emu, String> {
            let dir = std::env::temp_dir().join(format!("lossc-cuda-emu-{}", std::process::id()));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let cu = dir.join(format!("{tag}.cpp"));
            let so = dir.join(format!("{tag}.so"));
            std::fs::write(&cu, &source.text).map_err(|e| e.to_string())?;
            let out = std::process::Command::new("g++")
                .args(["-std=c++17", "-O0", "-w", "-shared", "-fPIC", "-include"])
                .arg(shim())
                .arg(&cu)
                .arg("-o")
                .arg(&so)
                .arg("-lpthread")
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(String::from_utf8_lossy(&out.stderr).into_owned());
            }
            // SAFETY: a library we just built from generated code and the shim.
            unsafe {
                let lib = libloading::Library::new(&so).map_err(|e| e.to_string())?;
                let mut kernels = Vec::new();
                for k in &source.kernels {
                    let f: libloading::Symbol<KernelFn> =
                        lib.get(k.name.as_bytes()).map_err(|e| e.to_string())?;
                    kernels.push(*f);
                }
                let begin = *lib
                    .get::<unsafe extern "C" fn(u32)>(b"lossc_emu_begin")
                    .map_err(|e| e.to_string())?;
                let end = *lib
                    .get::<unsafe extern "C" fn()>(b"lossc_emu_end")
                    .map_err(|e| e.to_string())?;
                let thread = *lib
                    .get::<unsafe extern "C" fn(u32, u32, u32, u32, u32, u32)>(b"lossc_emu_thread")
                    .map_err(|e| e.to_string())?;
                let _ = std::fs::remove_file(&so);
                let _ = std::fs::remove_file(&cu);
                Ok(Emu {
                    kernels,
                    begin,
                    end,
                    thread,
                    _lib: lib,
                    uploaded: Default::default(),
                })
            }
        }
    }

    /// Host memory in u64 words (aligned for every element type), and its
    /// size in bytes.
    pub struct Buf(Vec<u64>, usize);

    impl Machine for Emu {
        type Buf = Buf;

        fn alloc(&self, bytes: usize) -> Result<Buf, Diagnostic> {
            let bytes = bytes.max(1);
            Ok(Buf(vec![0u64; bytes.div_ceil(8)], bytes))
        }

        fn upload(&self, bytes: &[u8]) -> Result<Buf, Diagnostic> {
            self.uploaded
                .fetch_add(bytes.len(), std::sync::atomic::Ordering::SeqCst);
            let mut b = self.alloc(bytes.len())?;
            // SAFETY: the words hold at least `bytes.len()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    b.0.as_mut_ptr() as *mut u8,
                    bytes.len(),
                )
            };
            Ok(b)
        }

        fn size(&self, buf: &Buf) -> usize {
            buf.1
        }

        fn address(&self, buf: &Buf) -> u64 {
            buf.0.as_ptr() as u64
        }

        fn write(&self, buf: &mut Buf, offset: usize, bytes: &[u8]) -> Result<(), Diagnostic> {
            assert!(
                offset + bytes.len() <= buf.1,
                "a write past the end of a buffer"
            );
            // SAFETY: in bounds, checked above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    (buf.0.as_mut_ptr() as *mut u8).add(offset),
                    bytes.len(),
                )
            };
            Ok(())
        }

        fn launch(
            &self,
            k: usize,
            launch: &Launch,
            sizes: &[i64],
            args: [&Buf; 3],
        ) -> Result<(), Diagnostic> {
            let (bx, by, grid) = match launch {
                Launch::Grid { total } if sizes[*total] <= 0 => return Ok(()),
                Launch::Grid { .. } => (1, 1, 1),
                // Any power of two up to the shared arrays' size works, and
                // up to that many blocks; fewer threads spawn faster.
                Launch::Scalar { .. } => (8, 1, 3),
                Launch::Rows { total, .. } if sizes[*total] <= 0 => return Ok(()),
                Launch::Rows { .. } => (4, 1, 1),
                Launch::Tiled { .. } => (TILE, TILE, 1),
            };
            let f = self.kernels[k];
            let (t, d, e) = (
                args[0].0.as_ptr() as usize,
                args[1].0.as_ptr() as usize,
                args[2].0.as_ptr() as usize,
            );
            let thread = self.thread;
            // SAFETY: the shim's barrier for bx * by threads.
            unsafe { (self.begin)(bx * by) };
            // Blocks run one after the other, each block's threads at once.
            for block in 0..grid {
                std::thread::scope(|s| {
                    for y in 0..by {
                        for x in 0..bx {
                            s.spawn(move || {
                                // SAFETY: the kernel reads the pointer table
                                // and the buffers it names, which outlive the
                                // launch (`execute_on` holds them); bounds as
                                // on a GPU.
                                unsafe {
                                    thread(x, y, bx, by, block, grid);
                                    f(t as *const u64, d as *const i64, e as *mut i64);
                                }
                            });
                        }
                    }
                });
            }
            // SAFETY: every thread of the launch has finished.
            unsafe { (self.end)() };
            Ok(())
        }

        fn download(&self, buf: &Buf) -> Result<Vec<u8>, Diagnostic> {
            // SAFETY: the words hold `buf.1` bytes.
            Ok(unsafe { std::slice::from_raw_parts(buf.0.as_ptr() as *const u8, buf.1) }.to_vec())
        }
    }
}

/// Every node's value of two evaluations agrees to `rtol` relative to the
/// larger of the element and the node's largest magnitude: block reductions
/// and contractions sum in another order than the interpreter, and under
/// cancellation an element's rounding error is relative to its terms, not
/// to its value (as tests/jit.rs compares GEMM nodes); nodes that are zero
/// in exact arithmetic agree to `rtol / 1000` absolute. The loss, its
/// components and the gradients, what users see, are then compared as the
/// GPU agreement test does (`check_outputs`).
fn compare_all<F: lossc::interp::Real>(
    graph: &lossc::ir::Graph,
    want: &lossc::interp::Evaluation<F>,
    got: &lossc::interp::Evaluation<F>,
    rtol: f64,
) -> Result<(), String> {
    use lossc::interp::Tensor;
    for (i, (w, g)) in want.values.iter().zip(&got.values).enumerate() {
        let node =
            lossc::ir::print::print_node(graph, lossc::ir::NodeId(i as u32), &graph.nodes[i]);
        match (w, g) {
            (Tensor::F(w), Tensor::F(g)) => {
                if w.shape() != g.shape() {
                    return Err(format!("%{i}: shape {:?} vs {:?}", g.shape(), w.shape()));
                }
                let f = |x: &F| x.to_f64().unwrap_or(f64::NAN);
                let scale = w
                    .iter()
                    .map(f)
                    .filter(|x| x.is_finite())
                    .fold(0.0f64, |m, x| m.max(x.abs()));
                for (k, (a, b)) in g.iter().zip(w.iter()).enumerate() {
                    // `agree` floors at a thousandth of `scale`: this floors
                    // at `rtol` times the node's largest magnitude. Nodes
                    // that are zero in exact arithmetic hold rounding noise
                    // of the O(1) inputs: an absolute floor of rtol / 1000.
                    let noise = (f(a) - f(b)).abs() <= rtol * 1e-3;
                    if !noise && !agree(f(a), f(b), rtol, scale * 1e3) {
                        return Err(format!(
                            "%{i}[{k}]: emulated {:e}, interp {:e}\n  {node}",
                            f(a),
                            f(b)
                        ));
                    }
                }
            }
            (Tensor::I(w), Tensor::I(g)) if w == g => {}
            (Tensor::B(w), Tensor::B(g)) if w == g => {}
            _ => return Err(format!("%{i}: int/bool values differ\n  {node}")),
        }
    }
    Ok(())
}

/// The loss, components and gradient tensors agree: relative `rtol` for
/// values, and for gradients the fixture tests' standard,
/// |got - want| <= rtol (|want| + max |want|) (`common::grad_error`).
fn check_outputs<F: lossc::interp::Real>(
    full: &lossc::ir::Graph,
    bound: &bind::Bound,
    want: &lossc::interp::Evaluation<F>,
    got: &lossc::interp::Evaluation<F>,
    rtol: f64,
) -> Result<(), String> {
    let f = |x: &F| x.to_f64().unwrap_or(f64::NAN);
    for ((name, w), (_, g)) in want.outputs.iter().zip(&got.outputs) {
        if !agree(f(g), f(w), rtol, 1e-3) {
            return Err(format!("{name}: got {:e}, interp {:e}", f(g), f(w)));
        }
    }
    let gw = lossc::gradient_tensors(full, bound, want);
    let gg = lossc::gradient_tensors(full, bound, got);
    for ((name, w), (_, g)) in gw.iter().zip(&gg) {
        let (shape, w, mut g) = (&w.shape, w.to_f64_vec(), g.to_f64_vec());
        // Rows whose gradient cancels to almost nothing (a softmax row near
        // one-hot: MNRL at scale 50, rows of 1e-9 against rows of 2) hold
        // the rounding of the O(1) terms that cancelled, which the two
        // backends round differently: differences below a thousandth of
        // `rtol` times the tensor's largest element are that noise.
        let largest = w.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (a, b) in g.iter_mut().zip(&w) {
            if (*a - b).abs() <= rtol * 1e-3 * largest {
                *a = *b;
            }
        }
        let err = grad_error(&g, &w, shape, rtol, true);
        if err > 1.0 {
            return Err(format!("grad.{name}: error {err:.2} times the allowance"));
        }
    }
    Ok(())
}

fn emulate_case<F: lossc::interp::Real>(
    full: &lossc::ir::Graph,
    bound: &bind::Bound,
    p: Precision,
    machine: &emu::Emu,
    rtol: f64,
) -> Result<(), String> {
    let source = cuda::source(full, p)?;
    let want = lossc::interp::evaluate::<F>(full, bound);
    let got = cuda::execute_on::<F, _>(full, &source, p, machine, bound, RunOptions::full());
    let (want, (got, peak_all)) = match (want, got) {
        (Ok(w), Ok(g)) => (w, g),
        (Err(w), Err(g)) if w.code == g.code => return Ok(()),
        (w, g) => {
            return Err(format!(
                "interp {:?} vs emulated {:?}",
                w.err().map(|d| d.message),
                g.err().map(|d| d.message)
            ))
        }
    };
    compare_all(full, &want, &got, rtol)?;
    check_outputs(full, bound, &want, &got, rtol)?;
    // The lean run (outputs and gradients only, dead buffers freed) agrees.
    let (lean, peak) =
        cuda::execute_on::<F, _>(full, &source, p, machine, bound, RunOptions::lean())
            .map_err(|d| d.message)?;
    if lean.outputs != got.outputs {
        return Err("outputs of the lean run differ".into());
    }
    let gw = lossc::gradient_tensors(full, bound, &got);
    let gl = lossc::gradient_tensors(full, bound, &lean);
    if gw.len() != gl.len()
        || gw
            .iter()
            .zip(&gl)
            .any(|(a, b)| a.1.to_f64_vec() != b.1.to_f64_vec())
    {
        return Err("gradients of the lean run differ".into());
    }
    if peak > peak_all {
        return Err(format!(
            "freeing dead buffers raised the peak: {peak} > {peak_all}"
        ));
    }
    Ok(())
}

/// One run of the emulated kernels: a graph with bound inputs (and its
/// batch size, where the test picks options by it).
struct EmuCase {
    id: String,
    full: lossc::ir::Graph,
    bound: bind::Bound,
    b: i64,
}

/// Cases grouped by generated program: each group compiles once.
type EmuGroups = std::collections::BTreeMap<String, Vec<EmuCase>>;

fn add_case(groups: &mut EmuGroups, case: EmuCase) {
    let source = cuda::source(&case.full, Precision::F64).unwrap();
    let key = cuda::nvrtc::cache_key(&source.text, &[], (0, 0));
    groups.entry(key).or_default().push(case);
}

/// Runs `each` (machine, program, case → failures) on every case, on two
/// workers that never share a library (the shim's barrier is global);
/// returns every failure.
fn emulate_groups(
    groups: &EmuGroups,
    tag: &str,
    each: impl Fn(&emu::Emu, &cuda::codegen::Source, &EmuCase) -> Vec<String> + Sync,
) -> Vec<String> {
    let groups: Vec<_> = groups.iter().collect();
    let failures = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some((key, cases)) = groups.get(i) else {
                    break;
                };
                let source = cuda::source(&cases[0].full, Precision::F64).unwrap();
                let machine = match emu::Emu::compile(&source, &format!("{tag}{key}")) {
                    Ok(m) => m,
                    Err(e) => {
                        let id = &cases[0].id;
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{id}: host compile: {e}"));
                        continue;
                    }
                };
                for case in cases.iter() {
                    let found = each(&machine, &source, case);
                    failures.lock().unwrap().extend(found);
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn emulated_kernels_agree_with_the_interpreter_on_fixture_cases() {
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let start = std::time::Instant::now();
    let program = lossc::elab::Program::new();
    let mut groups = EmuGroups::new();
    // CI time is tight: by default the first two cases of each class (every
    // class, every kind of kernel); LOSSC_EMU_ALL=1 runs all 129 (about a
    // minute on two cores; all pass).
    let all = std::env::var_os("LOSSC_EMU_ALL").is_some_and(|v| v == "1");
    let mut per_class: std::collections::BTreeMap<String, usize> = Default::default();
    for case in manifest() {
        if lossc::select_loss(&program, None, Some(&case.class)).is_err() {
            continue;
        }
        let seen = per_class.entry(case.class.clone()).or_default();
        *seen += 1;
        if *seen > 2 && !all {
            continue;
        }
        let tensors = read_case(&case);
        let Ok(graph) = compile_std_for(&case.class, &case.params, &tensors) else {
            continue;
        };
        let full = lossc::differentiate(&graph).0;
        let Ok(bound) = bind::bind(&full, &tensors) else {
            continue;
        };
        let id = case.id.clone();
        add_case(
            &mut groups,
            EmuCase {
                id,
                full,
                bound,
                b: 0,
            },
        );
    }
    let setup_s = start.elapsed().as_secs_f64();
    let ran: usize = groups.values().map(|g| g.len()).sum();
    let failures = emulate_groups(&groups, "", |machine, _, case| {
        // f64, where a semantic slip cannot hide in rounding: only the
        // summation order differs from the interpreter.
        match emulate_case::<f64>(&case.full, &case.bound, Precision::F64, machine, 1e-9) {
            Ok(()) => vec![],
            Err(e) => vec![format!("{} f64: {e}", case.id)],
        }
    });
    eprintln!(
        "emulated: {ran} fixture cases, {} programs, {:.1} s ({setup_s:.1} s compiling the losses)",
        groups.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(ran >= 50, "only {ran} cases ran");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn emulated_out_of_range_index_is_the_interpreters_diagnostic() {
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let src =
        "loss L() {\n input x: [N]\n input idx: int[M]\n let y[m] = x[idx[m]]\n sum(m) y[m]\n}\n";
    let graph = compile_src(src, None, &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let source = cuda::source(&full, Precision::F64).unwrap();
    let machine = emu::Emu::compile(&source, "index_error").unwrap();
    let run = |json: &str| {
        let bound = bind::bind(&full, &tensors_of(json)).unwrap();
        let want = lossc::interp::evaluate::<f64>(&full, &bound);
        let got = cuda::execute_on::<f64, _>(
            &full,
            &source,
            Precision::F64,
            &machine,
            &bound,
            RunOptions::full(),
        );
        (want, got.map(|x| x.0))
    };
    let (want, got) = run(r#"{"x": [1.0, 2.0, 4.0], "idx": [0, 2, 2]}"#);
    assert_eq!(want.unwrap().outputs, got.unwrap().outputs);
    let (want, got) = run(r#"{"x": [1.0, 2.0], "idx": [0, 5]}"#);
    let (want, got) = (want.err().unwrap(), got.err().unwrap());
    assert_eq!(got.code, "LC0506");
    assert_eq!(got.message, want.message);
}

/// Losses whose kernels cover every kind (contractions of inputs, a concat,
/// pair reductions, mining, truncation), with their parameters.
const TILE_CROSSING_LOSSES: &[(&str, &str)] = &[
    ("MultipleNegativesRankingLoss", "{}"),
    ("CoSENTLoss", "{}"),
    ("BatchHardTripletLoss", "{}"),
    (
        "MatryoshkaLoss",
        r#"{"loss": {"st_class": "MultipleNegativesRankingLoss", "params": {}}, "matryoshka_dims": [40, 16]}"#,
    ),
];

/// A loss with its gradient and seeded random inputs at B = 70, D = 40,
/// K = 1: larger than one 64×64 contraction tile.
fn tile_crossing_case(
    class: &str,
    params: &str,
    seed: u64,
) -> (lossc::ir::Graph, lossc::tensor_io::TensorMap) {
    let graph = compile_std(class, &params_of(params)).unwrap();
    let full = lossc::differentiate(&graph).0;
    let known = full.dim_names();
    let dims = [("B", 70), ("D", 40), ("K", 1)]
        .into_iter()
        .filter(|(k, _)| known.contains(&k.to_string()))
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let tensors = bind::random_inputs(&full, seed, &dims).unwrap();
    (full, tensors)
}

#[test]
fn emulated_kernels_agree_at_sizes_that_cross_tiles() {
    // The fixtures are smaller than one 64×64 contraction tile; these sizes
    // make every kernel loop over several tiles, partial tiles and rows
    // longer than a block.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let mut failures = Vec::new();
    for (class, params) in TILE_CROSSING_LOSSES {
        let (full, tensors) = tile_crossing_case(class, params, 7);
        let bound = bind::bind(&full, &tensors).unwrap();
        let source = cuda::source(&full, Precision::F64).unwrap();
        let machine = emu::Emu::compile(&source, &format!("tiles_{class}")).unwrap();
        if let Err(e) = emulate_case::<f64>(&full, &bound, Precision::F64, &machine, 1e-9) {
            failures.push(format!("{class}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn emulated_reductions_keep_the_interpreters_special_values() {
    // -inf items (log 0), NaN items (log of a negative), ties: logsumexp,
    // max/min (first extreme, NaN wins), mean of an empty filtered set, both
    // to a scalar (the multi-block kernel) and per row.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let src = "loss L() {\n input x: [N]\n input y: [M, P]\n \
        output lse = logsumexp(i) log(x[i])\n \
        output mx = max(i) log(x[i])\n \
        output mn = min(i) log(x[i])\n \
        output empty = mean(i | x[i] > 100.0, else 7.0) x[i]\n \
        let row_lse[m] = logsumexp(j) log(y[m, j])\n \
        let row_max[m] = max(j) log(y[m, j])\n \
        output rows = sum(m) (row_lse[m] + row_max[m])\n \
        sum(i) x[i]\n}\n";
    let graph = compile_src(src, None, &lossc::Params::new()).unwrap();
    let source = cuda::source(&graph, Precision::F64).unwrap();
    let machine = emu::Emu::compile(&source, "special").unwrap();
    for (x, y) in [
        ("[0.0, 0.0, 0.0]", "[[0.0, 0.0], [1.0, 0.0]]"),
        ("[0.0, 1.0, 1.0]", "[[2.0, 2.0], [0.0, 3.0]]"),
        ("[1.0, -1.0, 2.0]", "[[1.0, -1.0], [-2.0, 5.0]]"),
        ("[3.0, 3.0, -1.0]", "[[0.0, -1.0], [4.0, 4.0]]"),
    ] {
        let tensors = tensors_of(&format!(r#"{{"x": {x}, "y": {y}}}"#));
        let bound = bind::bind(&graph, &tensors).unwrap();
        let want = lossc::interp::evaluate::<f64>(&graph, &bound).unwrap();
        let (got, _) = cuda::execute_on::<f64, _>(
            &graph,
            &source,
            Precision::F64,
            &machine,
            &bound,
            RunOptions::full(),
        )
        .unwrap();
        compare_all(&graph, &want, &got, 1e-12).unwrap_or_else(|e| panic!("x = {x}: {e}"));
        for ((name, w), (_, g)) in want.outputs.iter().zip(&got.outputs) {
            assert!(
                w == g || (w.is_nan() && g.is_nan()) || (w - g).abs() <= 1e-12 * w.abs(),
                "x = {x}, y = {y}: {name}: emulated {g}, interp {w}"
            );
        }
    }
}

/// Options for a lean run that streams as `streaming` says.
fn lean(streaming: cuda::Streaming, tile_rows: Option<usize>) -> RunOptions {
    RunOptions {
        threads: 1,
        streaming,
        tile_rows,
        lean: true,
    }
}

/// Whether a run takes a streamed pass, and the nodes it keeps as tiles.
fn streamed_nodes(
    full: &lossc::ir::Graph,
    source: &cuda::codegen::Source,
    bound: &bind::Bound,
    opts: RunOptions,
) -> Vec<lossc::ir::NodeId> {
    cuda::steps(full, source, Precision::F64, bound, opts)
        .unwrap()
        .into_iter()
        .flat_map(|s| match s {
            lossc::stream::Step::Pass(p) => p.streamed,
            lossc::stream::Step::Whole(_) => vec![],
        })
        .collect()
}

#[test]
fn emulated_streaming_agrees_with_the_interpreter_on_every_library_loss() {
    // Lean runs that stream every in-batch matrix in blocks of rows (B = 3
    // in 1-row blocks; B = 17 in 4-row blocks, the last one short, and
    // `auto`, which streams nothing this small): values and gradients as
    // the interpreter's, in f64, on the kernels compiled for the CPU.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let configs = |b: i64| match b {
        3 => vec![("1-row blocks", lean(cuda::Streaming::Always, Some(1)))],
        _ => vec![
            ("4-row blocks", lean(cuda::Streaming::Always, Some(4))),
            ("auto", RunOptions::lean()),
        ],
    };
    let mut groups = EmuGroups::new();
    for class in library_classes() {
        let mut params = first_case_params(&class);
        if params.contains_key("matryoshka_dims") {
            params.insert("matryoshka_dims".into(), serde_json::json!([5, 4, 2]));
        }
        let Ok(base) = compile_std(&class, &params) else {
            continue;
        };
        // Variadic inputs: none at B = 3 (an empty column range), two at 17.
        let variadic = base.inputs().any(|(_, _, _, variadic)| variadic);
        for (seed, b, k) in [(3u64, 3i64, 0i64), (4, 17, 2)] {
            let k = if variadic { k } else { 1 };
            let Some((full, bound)) = random_library_case(&class, &params, &base, (b, k), seed)
            else {
                continue;
            };
            let id = format!("{class} B={b} K={k}");
            add_case(&mut groups, EmuCase { id, full, bound, b });
        }
    }
    let streamed_classes = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let runs = std::sync::atomic::AtomicUsize::new(0);
    let failures = emulate_groups(&groups, "stream_", |machine, source, case| {
        let (full, bound) = (&case.full, &case.bound);
        let Ok(want) = lossc::interp::evaluate::<f64>(full, bound) else {
            return vec![]; // a runtime error: covered above
        };
        let mut failures = vec![];
        for (label, opts) in configs(case.b) {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if !streamed_nodes(full, source, bound, opts).is_empty() {
                let class = case.id.split(' ').next().unwrap_or_default();
                streamed_classes.lock().unwrap().insert(class.to_string());
            }
            let got =
                cuda::execute_on::<f64, _>(full, source, Precision::F64, machine, bound, opts);
            let result = got
                .map_err(|d| d.message)
                .and_then(|(got, _)| check_outputs(full, bound, &want, &got, 1e-9));
            if let Err(e) = result {
                failures.push(format!("{} {label}: {e}", case.id));
            }
        }
        failures
    });
    let streamed_classes = streamed_classes.into_inner().unwrap();
    let runs = runs.into_inner();
    eprintln!("emulated streaming: {runs} runs; losses with a streamed pass: {streamed_classes:?}");
    assert!(runs > 60, "only {runs} runs");
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    for class in IN_BATCH_LOSSES.iter().chain(&["MatryoshkaLoss"]) {
        assert!(
            streamed_classes.contains(*class),
            "{class} never streamed; streamed: {streamed_classes:?}"
        );
    }
}

#[test]
fn emulated_streamed_accumulations_keep_running_means_counts_and_empty_values() {
    // Reductions over the rows of a streamed matrix merge block by block:
    // a filtered mean and a sum with an `else` value keep a running fold
    // and count (per column, and to a scalar), a count adds up. Blocks of 3
    // rows over 10, so some blocks pass no element of a column.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let src = "loss L() {\n input x: [B, D]\n input y: [N, D]\n \
        let s[i, c] = sum(k) x[i, k] * y[c, k]\n \
        let m[c] = mean(i | s[i, c] > 0.5, else 3.0) s[i, c]\n \
        let n[c] = count(i | s[i, c] > 0.5)\n \
        output far = sum(i, c | s[i, c] > 1.5, else 7.0) s[i, c]\n \
        output none = mean(i, c | s[i, c] > 100.0, else -2.0) s[i, c]\n \
        sum(c) (m[c] + float(n[c]))\n}\n";
    let graph = compile_src(src, None, &lossc::Params::new()).unwrap();
    let source = cuda::source(&graph, Precision::F64).unwrap();
    let machine = emu::Emu::compile(&source, "accumulations").unwrap();
    let dims: std::collections::BTreeMap<String, i64> = [("B", 10), ("D", 3), ("N", 6)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let tensors = bind::random_inputs(&graph, 5, &dims).unwrap();
    let bound = bind::bind(&graph, &tensors).unwrap();
    let opts = lean(cuda::Streaming::Always, Some(3));
    assert_eq!(streamed_nodes(&graph, &source, &bound, opts).len(), 1);
    let want = lossc::interp::evaluate::<f64>(&graph, &bound).unwrap();
    let (got, _) =
        cuda::execute_on::<f64, _>(&graph, &source, Precision::F64, &machine, &bound, opts)
            .unwrap();
    assert_eq!(got.outputs.len(), 3);
    for ((name, w), (_, g)) in want.outputs.iter().zip(&got.outputs) {
        assert!(
            (w - g).abs() <= 1e-12 * w.abs().max(1.0),
            "{name}: streamed {g}, interp {w}"
        );
    }
    let none = want.outputs.iter().find(|(n, _)| n == "none").unwrap().1;
    assert_eq!(none, -2.0, "the filter passes nothing: the else value");
}

#[test]
fn emulated_streamed_mnrl_holds_tiles_not_matrices() {
    // MNRL at B = 64, N = 128: a run streamed in 8-row blocks holds no
    // [B, N] matrix; its peak of node buffers is at least one whole matrix
    // below the unstreamed lean run's, with the same loss and gradients.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    let graph = compile_std("MultipleNegativesRankingLoss", &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let dims: std::collections::BTreeMap<String, i64> = [("B", 64), ("D", 8), ("K", 1)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let tensors = bind::random_inputs(&full, 9, &dims).unwrap();
    let bound = bind::bind(&full, &tensors).unwrap();
    let source = cuda::source(&full, Precision::F64).unwrap();
    let machine = emu::Emu::compile(&source, "mnrl_tiles").unwrap();
    let never = lean(cuda::Streaming::Never, None);
    let always = lean(cuda::Streaming::Always, Some(8));
    let streamed = streamed_nodes(&full, &source, &bound, always);
    assert!(streamed.len() >= 3, "streamed {streamed:?}");
    let run = |opts| {
        cuda::execute_on::<f64, _>(&full, &source, Precision::F64, &machine, &bound, opts).unwrap()
    };
    let ((whole, peak_whole), (tiled, peak_tiled)) = (run(never), run(always));
    let want = lossc::interp::evaluate::<f64>(&full, &bound).unwrap();
    check_outputs(&full, &bound, &want, &whole, 1e-9).unwrap();
    check_outputs(&full, &bound, &want, &tiled, 1e-9).unwrap();
    let matrix = 64 * 128 * 8;
    assert!(
        peak_tiled + matrix <= peak_whole,
        "peak {peak_tiled} B streamed vs {peak_whole} B whole"
    );
}

/// Every float input rounded to bfloat16: what a device with bf16 inputs holds.
fn round_to_bf16(tensors: &mut lossc::tensor_io::TensorMap) {
    for t in tensors.values_mut() {
        if let lossc::tensor_io::TensorData::F64(v) = &mut t.data {
            for x in v.iter_mut() {
                *x = half::bf16::from_f64(*x).to_f64();
            }
        }
    }
}

#[test]
fn emulated_bf16_inputs_are_stored_in_half_the_bytes_and_widened_exactly() {
    // With bf16 inputs the device holds each float input in two bytes and
    // the kernels widen it exactly: the values and gradients are the f32
    // interpreter's on the inputs rounded to bfloat16 (to f32 summation
    // order), and the inputs uploaded take half the f32 run's bytes.
    if let Err(e) = emu::available() {
        eprintln!("SKIP emulated kernels: {e}");
        return;
    }
    for (class, params) in TILE_CROSSING_LOSSES {
        let (full, mut tensors) = tile_crossing_case(class, params, 3);
        round_to_bf16(&mut tensors);
        let bound = bind::bind(&full, &tensors).unwrap();
        let want = lossc::interp::evaluate::<f32>(&full, &bound).unwrap();
        let f32_source = cuda::source(&full, Precision::F32).unwrap();
        let bf16_source = cuda::source_with(&full, Precision::F32, Inputs::Bf16).unwrap();
        assert!(cuda::source_with(&full, Precision::F64, Inputs::Bf16).is_err());
        let mut uploaded = vec![];
        for (tag, source) in [("f32", &f32_source), ("bf16", &bf16_source)] {
            let machine = emu::Emu::compile(source, &format!("bf16_{class}_{tag}")).unwrap();
            let (got, _) = cuda::execute_on::<f32, _>(
                &full,
                source,
                Precision::F32,
                &machine,
                &bound,
                RunOptions::full(),
            )
            .unwrap();
            check_outputs(&full, &bound, &want, &got, 1e-4)
                .unwrap_or_else(|e| panic!("{class} {tag}: {e}"));
            // Inputs come back as the values the kernels read.
            for (id, ..) in full.inputs() {
                let (lossc::interp::Tensor::F(g), lossc::interp::Tensor::F(w)) =
                    (&got.values[id.index()], &want.values[id.index()])
                else {
                    continue;
                };
                assert_eq!(g, w, "{class} {tag}: input %{}", id.0);
            }
            uploaded.push(machine.uploaded.load(std::sync::atomic::Ordering::SeqCst));
        }
        let float_inputs: usize = full
            .inputs()
            .filter(|(id, ..)| full.node(*id).dtype == lossc::ir::DType::Float)
            .map(|(id, ..)| bound.input(id).unwrap().tensor.len())
            .sum();
        assert!(float_inputs > 0);
        assert_eq!(
            uploaded[0] - uploaded[1],
            2 * float_inputs,
            "{class}: {} bytes uploaded with bf16 inputs, {} with f32 ones",
            uploaded[1],
            uploaded[0]
        );
    }
}

#[test]
fn siblings_with_the_same_loops_share_one_kernel() {
    // TripletLoss's three [B, D] gradients and its two [B] distance
    // adjoints (the JIT's groups): one kernel each, launched once.
    let full = first_case_graph("TripletLoss");
    let source = cuda::source(&full, Precision::F32).unwrap();
    let mut sizes: Vec<usize> = source.kernels.iter().map(|k| k.members.len()).collect();
    sizes.sort();
    assert_eq!(
        sizes.iter().rev().take(2).collect::<Vec<_>>(),
        [&3, &2],
        "{sizes:?}"
    );
    for k in source.kernels.iter().filter(|k| k.members.len() > 1) {
        assert!(k.name.starts_with("lossc_g"));
        assert!(
            source.text.contains(&format!("void {}(", k.name)),
            "{}",
            k.name
        );
        // Siblings: none reads another.
        for m in &k.members {
            assert!(full.operands(*m).iter().all(|o| !k.members.contains(o)));
        }
    }
}

/// A device that only counts: buffers are sizes, kernels do not run. The
/// host logic (plan, allocation, freeing) runs as on a GPU, so the device
/// memory a run would take is measured without one.
struct Dry;

impl cuda::Machine for Dry {
    type Buf = usize;

    fn alloc(&self, bytes: usize) -> Result<usize, lossc::syntax::Diagnostic> {
        Ok(bytes.max(1))
    }

    fn upload(&self, bytes: &[u8]) -> Result<usize, lossc::syntax::Diagnostic> {
        Ok(bytes.len().max(1))
    }

    fn size(&self, buf: &usize) -> usize {
        *buf
    }

    fn address(&self, _: &usize) -> u64 {
        0
    }

    fn write(&self, _: &mut usize, _: usize, _: &[u8]) -> Result<(), lossc::syntax::Diagnostic> {
        Ok(())
    }

    fn launch(
        &self,
        _: usize,
        _: &cuda::codegen::Launch,
        _: &[i64],
        _: [&usize; 3],
    ) -> Result<(), lossc::syntax::Diagnostic> {
        Ok(())
    }

    fn download(&self, buf: &usize) -> Result<Vec<u8>, lossc::syntax::Diagnostic> {
        Ok(vec![0; *buf])
    }
}

/// MNRL's device memory at B = 65536 (K = 0) and `d`: the peak of node
/// buffers a lean f32 run holds, its inputs' bytes and its gradients'.
fn mnrl_device_bytes(d: i64) -> (u64, u64, u64) {
    let graph = compile_std("MultipleNegativesRankingLoss", &lossc::Params::new()).unwrap();
    let full = lossc::differentiate(&graph).0;
    let dims = [("B", 65536), ("D", d), ("K", 0)]
        .map(|(k, v)| (k.to_string(), v))
        .into();
    let tensors = bind::random_inputs(&full, 1, &dims).unwrap();
    let bound = bind::bind(&full, &tensors).unwrap();
    let source = cuda::source(&full, Precision::F32).unwrap();
    let (eval, peak) = cuda::execute_on::<f32, _>(
        &full,
        &source,
        Precision::F32,
        &Dry,
        &bound,
        RunOptions::lean(),
    )
    .unwrap();
    let inputs: u64 = bound.inputs.iter().map(|i| 4 * i.tensor.len() as u64).sum();
    let grads: u64 = lossc::gradient_tensors(&full, &bound, &eval)
        .iter()
        .map(|(_, t)| 4 * t.len() as u64)
        .sum();
    (peak, inputs, grads)
}

#[test]
fn mnrl_at_b_65536_plans_under_one_gib_of_device_memory_beyond_inputs_and_gradients() {
    // The issue's memory target, measured on the host logic with a device
    // that only counts (no GPU needed): the 16 GiB score matrix and its
    // gradients stream, so the peak of node buffers beyond inputs and
    // gradients stays under 1 GiB. D = 64 here (CI memory);
    // LOSSC_MNRL_D=768 measures the issue's size (about 1.5 GB of host
    // memory for the inputs).
    let d: i64 = std::env::var("LOSSC_MNRL_D")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let (peak, inputs, grads) = mnrl_device_bytes(d);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let beyond = peak.saturating_sub(inputs + grads);
    eprintln!(
        "MNRL B=65536 D={d}: peak {:.0} MiB of node buffers, inputs {:.0} MiB, gradients {:.0} MiB, beyond them {:.0} MiB",
        mib(peak),
        mib(inputs),
        mib(grads),
        mib(beyond)
    );
    let scores = 65536u64 * 65536 * 4;
    assert!(peak < scores / 8, "a score-sized buffer was held: {peak} B");
    assert!(beyond < 1 << 30, "{beyond} B beyond inputs and gradients");
}

#[test]
fn gpu_bf16_inputs_agree_with_the_interpreter_on_rounded_inputs() {
    if let Err(d) = cuda::device() {
        eprintln!("SKIP GPU bf16 test: {} ({})", d.message, d.code);
        return;
    }
    let mut failures = Vec::new();
    for (class, params) in TILE_CROSSING_LOSSES {
        let (full, mut tensors) = tile_crossing_case(class, params, 5);
        round_to_bf16(&mut tensors);
        let bound = bind::bind(&full, &tensors).unwrap();
        let want = lossc::interp::evaluate::<f32>(&full, &bound).unwrap();
        let result = cuda::compile_with(&full, Precision::F32, Inputs::Bf16)
            .and_then(|gpu| gpu.run_outputs::<f32>(&bound))
            .map_err(|d| d.message)
            .and_then(|got| check_outputs(&full, &bound, &want, &got, 1e-4));
        if let Err(e) = result {
            failures.push(format!("{class}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
