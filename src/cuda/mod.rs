//! The CUDA backend: the optimised forward-plus-gradient graph as CUDA C
//! kernels, compiled at run time with NVRTC and launched through cudarc. It
//! returns the interpreter's `Evaluation`, so gradients, tests and the CLI
//! work unchanged with it.
//!
//! # Steps
//!
//! 1. **Generate** (`codegen.rs`, pure, runs anywhere): one kernel per
//!    non-input node, the dim table, the bounds proofs and the error sites.
//!    Contractions are recognised by `ir::contraction` and become tiled kernels.
//! 2. **Find the device** (`device`): cudarc loads libcuda at run time
//!    (dynamic loading), so the crate builds and its CPU tests pass without
//!    CUDA. No driver is the diagnostic LC0601 "no CUDA driver found", never a
//!    panic: presence is checked before cudarc is asked for the library, and
//!    the first driver call runs under `catch_unwind`.
//! 3. **Compile** (`nvrtc.rs`): the program's source to PTX for the device's
//!    compute capability, through the on-disk cache keyed by a hash of the
//!    source, options and NVRTC version; the driver loads the PTX as one
//!    module.
//! 4. **Run** (`CudaProgram::run`): evaluate the dim table from the bound
//!    sizes and re-check every bounds proof numerically; upload the inputs
//!    (converted to the precision); then node by node allocate the output,
//!    publish its pointer in the device table every kernel reads, and launch
//!    its kernel, all on one stream. Buffers no later kernel reads are freed
//!    as soon as their last reader is launched (`run_outputs`), so device
//!    memory holds the live nodes only. Finally read the error word and copy
//!    back every node (`run`) or only the outputs and gradients
//!    (`run_outputs`, what the CLI needs).
//!
//! # Invariants
//!
//! * Kernels never read or write out of bounds (see `codegen`): proofs are
//!   re-checked on the host before any launch, the rest is checked in the
//!   kernel, and a failed check becomes the interpreter's diagnostic
//!   (LC0506). Which failing element is reported may differ from the
//!   interpreter's when several fail: threads race for the error word.
//! * Same semantics as `interp` for every operation (codegen's module doc);
//!   sums in reductions to a scalar and in contractions are in another order
//!   (tree, tiles) and math functions are CUDA's, so values agree to rounding.
//! * Nothing here panics on a missing library or device.

pub mod codegen;

mod exec;

pub mod nvrtc;

use crate::bind::Bound;
use crate::interp::{Evaluation, Real, Tensor};
use crate::ir::{DType, Graph, NodeKind};
use crate::stream::{self, Budget, Step};
use crate::syntax::{codes, Diagnostic};
use crate::tensor_io::TensorData;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use ndarray::{ArrayD, IxDyn};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

pub use crate::jit::{Precision, RunOptions, Streaming};
pub use codegen::Inputs;
pub use exec::{execute_on, steps};

/// What the GPU trades for recomputation: it has memory to spare and many
/// cores to fill, so it streams only matrices of 256 MiB or more, in tiles
/// of about 256 MiB.
pub const GPU_BUDGET: Budget = Budget {
    auto_min_bytes: 256 << 20,
    recompute_min_bytes: 0,
    tile_bytes: 256 << 20,
    min_tile_rows: 256,
};

/// The CUDA C of a graph (every kernel, in node order), for `lossc cuda` and
/// the snapshot tests.
pub fn source(graph: &Graph, p: Precision) -> Result<codegen::Source, String> {
    source_with(graph, p, Inputs::Native)
}

/// `source` with float inputs stored as `inputs` says.
pub fn source_with(graph: &Graph, p: Precision, inputs: Inputs) -> Result<codegen::Source, String> {
    crate::ir::verify::verify(graph)?;
    codegen::generate(graph, p, inputs)
}

/// The GPU every program runs on: device 0, its primary context and stream.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// `compute_XY` for NVRTC.
    pub arch: String,
    pub name: String,
}

fn unavailable(message: impl Into<String>) -> Diagnostic {
    Diagnostic::error(codes::BACKEND_UNAVAILABLE, message).with_help(
        "the CUDA backend needs an NVIDIA GPU with its driver (libcuda.so) and NVRTC; \
         use --backend jit or --backend interp on this machine",
    )
}

fn failed(message: impl Into<String>) -> Diagnostic {
    Diagnostic::error(codes::BACKEND_FAILED, message)
}

/// The device, found once per process; the diagnostic says why there is none.
pub fn device() -> Result<&'static Device, Diagnostic> {
    static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();
    DEVICE
        .get_or_init(find_device)
        .as_ref()
        .map_err(|e| unavailable(e.clone()))
}

fn find_device() -> Result<Device, String> {
    // SAFETY: only tries to open candidate library names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no CUDA driver found (libcuda.so could not be loaded)".into());
    }
    let ctx = std::panic::catch_unwind(|| CudaContext::new(0))
        .map_err(|_| "no CUDA driver found (libcuda.so lacks a required function)".to_string())?
        .map_err(|e| format!("no usable CUDA device: {e:?}"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(|e| format!("cannot query the CUDA device: {e:?}"))?;
    let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
    let stream = ctx.default_stream();
    Ok(Device {
        ctx,
        stream,
        arch: format!("compute_{major}{minor}"),
        name,
    })
}

/// A graph's kernels compiled and loaded at one precision.
struct Compiled {
    precision: Precision,
    source: codegen::Source,
    functions: Vec<CudaFunction>,
    compile_ms: f64,
    from_cache: bool,
}

/// A graph compiled for the GPU, runnable on any sizes.
pub struct CudaProgram {
    graph: Graph,
    compiled: Arc<Compiled>,
    other: Mutex<Option<Arc<Compiled>>>,
    peak: Mutex<u64>,
}

/// Generates, compiles (through the PTX cache) and loads the kernels of
/// `graph` for precision `p`.
pub fn compile(graph: &Graph, p: Precision) -> Result<CudaProgram, Diagnostic> {
    compile_with(graph, p, Inputs::Native)
}

/// `compile` with float inputs stored as `inputs` says (bf16: precision f32).
pub fn compile_with(
    graph: &Graph,
    p: Precision,
    inputs: Inputs,
) -> Result<CudaProgram, Diagnostic> {
    let dev = device()?;
    let compiled =
        std::panic::catch_unwind(|| compile_for(graph, p, inputs, dev)).map_err(|_| {
            failed("the CUDA driver or NVRTC library lacks a function lossc needs (too old?)")
        })??;
    let compiled = Arc::new(compiled);
    Ok(CudaProgram {
        graph: graph.clone(),
        compiled,
        other: Mutex::new(None),
        peak: Mutex::new(0),
    })
}

fn compile_for(
    graph: &Graph,
    p: Precision,
    inputs: Inputs,
    dev: &Device,
) -> Result<Compiled, Diagnostic> {
    let start = Instant::now();
    let source = source_with(graph, p, inputs)
        .map_err(|e| failed(format!("internal error: CUDA code generation failed: {e}")))?;
    nvrtc::load().map_err(unavailable)?;
    let (ptx, from_cache) = nvrtc::compile_cached(&source.text, &dev.arch).map_err(|e| {
        failed(format!(
            "internal error: NVRTC rejected the generated CUDA C of `{}`: {e}",
            graph.name
        ))
    })?;
    let module = dev
        .ctx
        .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
        .map_err(|e| {
            failed(format!(
                "the CUDA driver cannot load the PTX ({e:?}); if the driver is older than NVRTC, \
                 point LOSSC_NVRTC at a libnvrtc of the driver's CUDA version"
            ))
        })?;
    let mut functions = Vec::with_capacity(source.kernels.len());
    for k in &source.kernels {
        functions.push(
            module
                .load_function(&k.name)
                .map_err(|e| failed(format!("kernel {}: {e:?}", k.name)))?,
        );
    }
    Ok(Compiled {
        precision: p,
        source,
        functions,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        from_cache,
    })
}

impl CudaProgram {
    /// Milliseconds spent generating, compiling and loading the kernels.
    pub fn compile_ms(&self) -> f64 {
        self.compiled.compile_ms
    }

    /// Whether the PTX came from the on-disk cache.
    pub fn from_cache(&self) -> bool {
        self.compiled.from_cache
    }

    /// The most device memory the node buffers of one run held at once, in
    /// bytes, over every run so far.
    pub fn peak_device_bytes(&self) -> u64 {
        *self.peak.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The passes over blocks of rows a run at these sizes takes (empty
    /// when nothing streams).
    pub fn schedule(
        &self,
        bound: &Bound,
        opts: RunOptions,
    ) -> Result<Vec<stream::Pass>, Diagnostic> {
        let steps = steps(
            &self.graph,
            &self.compiled.source,
            self.compiled.precision,
            bound,
            opts,
        )?;
        Ok(steps
            .into_iter()
            .filter_map(|s| match s {
                Step::Pass(p) => Some(p),
                Step::Whole(_) => None,
            })
            .collect())
    }

    /// Every node's value, as `interp::evaluate` returns it (nothing
    /// streamed).
    pub fn run<F: Real>(&self, bound: &Bound) -> Result<Evaluation<F>, Diagnostic> {
        self.run_with(bound, RunOptions::full())
    }

    /// The outputs and gradient nodes only (other values are empty): frees
    /// every other buffer as soon as it is dead, streams the in-batch
    /// matrices that would take much device memory, and copies back little.
    pub fn run_outputs<F: Real>(&self, bound: &Bound) -> Result<Evaluation<F>, Diagnostic> {
        self.run_with(bound, RunOptions::lean())
    }

    /// `run` with options: streaming, tile rows, and whether every node's
    /// value is kept (`threads` is the JIT's and is ignored).
    pub fn run_with<F: Real>(
        &self,
        bound: &Bound,
        opts: RunOptions,
    ) -> Result<Evaluation<F>, Diagnostic> {
        let p = Precision::of::<F>()
            .ok_or_else(|| failed("the CUDA backend runs in f32 or f64 only"))?;
        let dev = device()?;
        let compiled = if p == self.compiled.precision {
            self.compiled.clone()
        } else {
            let mut other = self.other.lock().unwrap_or_else(|e| e.into_inner());
            match &*other {
                Some(c) if c.precision == p => c.clone(),
                _ => {
                    if self.compiled.source.inputs != Inputs::Native {
                        return Err(failed(
                            "a program with bf16 inputs runs in f32 only (--dtype bf16)",
                        ));
                    }
                    let c = Arc::new(compile_for(&self.graph, p, Inputs::Native, dev)?);
                    *other = Some(c.clone());
                    c
                }
            }
        };
        // cudarc panics on a driver symbol it cannot find; that is a
        // diagnostic here, not a crash.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            execute::<F>(&self.graph, &compiled, dev, bound, opts)
        }));
        let (eval, peak) = run.map_err(|_| {
            failed("the CUDA driver library lacks a function lossc needs (driver too old?)")
        })??;
        let mut best = self.peak.lock().unwrap_or_else(|e| e.into_inner());
        *best = (*best).max(peak);
        Ok(eval)
    }
}

fn driver(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Diagnostic + '_ {
    move |e| failed(format!("CUDA {what} failed: {e:?}"))
}

fn shape_error(msg: String) -> Diagnostic {
    Diagnostic::error(codes::TENSOR_SHAPE, msg)
}

/// Bytes of one element of a node's buffer (`bf16`: a float input stored
/// as bfloat16).
fn buffer_elem_bytes(dtype: DType, p: Precision, bf16: bool) -> usize {
    if bf16 && dtype == DType::Float {
        2
    } else {
        elem_bytes(dtype, p)
    }
}

fn elem_bytes(dtype: DType, p: Precision) -> usize {
    match (dtype, p) {
        (DType::Float, Precision::F32) => 4,
        (DType::Float, Precision::F64) => 8,
        (DType::Int, _) => 8,
        (DType::Bool, _) => 1,
    }
}

/// An input's elements as the bytes of its device buffer; floats as
/// bfloat16 (rounded to nearest even) when `bf16`.
fn input_bytes<F: Real>(data: &TensorData, dtype: DType, bf16: bool) -> Vec<u8> {
    let float = |x: f64| -> Vec<u8> {
        if bf16 {
            return half::bf16::from_f64(x).to_bits().to_ne_bytes().to_vec();
        }
        let v = F::from_f64(x).unwrap_or_else(F::nan);
        match Precision::of::<F>() {
            Some(Precision::F32) => v.to_f32().unwrap_or(f32::NAN).to_ne_bytes().to_vec(),
            _ => v.to_f64().unwrap_or(f64::NAN).to_ne_bytes().to_vec(),
        }
    };
    match (data, dtype) {
        (TensorData::F64(v), _) => v.iter().flat_map(|x| float(*x)).collect(),
        (TensorData::F32(v), _) => v.iter().flat_map(|x| float(f64::from(*x))).collect(),
        (TensorData::I64(v), _) => v.iter().flat_map(|x| x.to_ne_bytes()).collect(),
        (TensorData::Bool(v), _) => v.iter().map(|b| u8::from(*b)).collect(),
    }
}

/// A device buffer's bytes as the node's value.
fn tensor_of<F: Real>(
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    bf16: bool,
) -> Result<Tensor<F>, Diagnostic> {
    let dims = IxDyn(shape);
    let bad = |e: ndarray::ShapeError| shape_error(format!("internal shape error: {e}"));
    Ok(match dtype {
        DType::Float => {
            let v: Vec<F> = match Precision::of::<F>() {
                _ if bf16 => bytes
                    .chunks_exact(2)
                    .map(|c| {
                        let h = half::bf16::from_bits(u16::from_ne_bytes([c[0], c[1]]));
                        F::from_f32(h.to_f32()).unwrap_or_else(F::nan)
                    })
                    .collect(),
                Some(Precision::F32) => bytes
                    .chunks_exact(4)
                    .map(|c| {
                        F::from_f32(f32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                            .unwrap_or_else(F::nan)
                    })
                    .collect(),
                _ => bytes
                    .chunks_exact(8)
                    .map(|c| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(c);
                        F::from_f64(f64::from_ne_bytes(b)).unwrap_or_else(F::nan)
                    })
                    .collect(),
            };
            Tensor::F(ArrayD::from_shape_vec(dims, v).map_err(bad)?)
        }
        DType::Int => {
            let v: Vec<i64> = bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    i64::from_ne_bytes(b)
                })
                .collect();
            Tensor::I(ArrayD::from_shape_vec(dims, v).map_err(bad)?)
        }
        DType::Bool => Tensor::B(
            ArrayD::from_shape_vec(dims, bytes.iter().map(|b| *b != 0).collect()).map_err(bad)?,
        ),
    })
}

/// The placeholder value of a node `run_outputs` does not copy back.
fn empty_tensor<F: Real>(dtype: DType) -> Tensor<F> {
    let dims = IxDyn(&[0]);
    match dtype {
        DType::Float => Tensor::F(ArrayD::from_elem(dims, F::zero())),
        DType::Int => Tensor::I(ArrayD::from_elem(dims, 0)),
        DType::Bool => Tensor::B(ArrayD::from_elem(dims, false)),
    }
}

/// Each node's shape at the bound sizes; one that cannot be evaluated
/// reports the interpreter's first error (`interp::first_error`).
fn node_shapes(graph: &Graph, bound: &Bound) -> Result<Vec<Vec<usize>>, Diagnostic> {
    evaluate_shapes(graph, bound).map_err(|e| crate::interp::first_error(graph, bound, e))
}

fn evaluate_shapes(graph: &Graph, bound: &Bound) -> Result<Vec<Vec<usize>>, Diagnostic> {
    graph
        .nodes
        .iter()
        .map(|node| {
            node.shape
                .iter()
                .map(|d| match d.eval(&bound.sizes) {
                    Some(v) if v >= 0 => Ok(v as usize),
                    _ => Err(shape_error(format!(
                        "the size {d} is unknown or negative for these inputs"
                    ))),
                })
                .collect()
        })
        .collect()
}

/// The host-side checks the interpreter's layout operations make.
fn check_layout(
    graph: &Graph,
    shapes: &[Vec<usize>],
    i: usize,
    bound: &Bound,
) -> Result<(), Diagnostic> {
    let shape = &shapes[i];
    match &graph.nodes[i].kind {
        NodeKind::Concat { axis, parts } => {
            let axis = *axis;
            let mut along = 0;
            for p in parts {
                let s = &shapes[p.index()];
                let agrees = s.len() == shape.len()
                    && s.iter()
                        .enumerate()
                        .all(|(a, d)| a == axis || *d == shape[a]);
                if !agrees {
                    return Err(shape_error(format!(
                        "concat failed: part shape {s:?} does not fit {shape:?} off axis {axis}"
                    )));
                }
                along += s[axis];
            }
            if along != shape[axis] {
                return Err(shape_error(format!(
                    "concat of {along} along axis {axis} where {} was expected",
                    shape[axis]
                )));
            }
        }
        NodeKind::Slice { src, axis, start } => {
            let s = &shapes[src.index()];
            let begin = start.eval(&bound.sizes).unwrap_or(0);
            let fits = s.len() == shape.len()
                && begin >= 0
                && (begin as usize)
                    .checked_add(shape[*axis])
                    .is_some_and(|e| e <= s[*axis])
                && s.iter()
                    .enumerate()
                    .all(|(a, d)| a == *axis || *d == shape[a]);
            if !fits {
                return Err(shape_error(format!(
                    "slice {begin}..{begin}+{} along axis {axis} does not fit a value of shape {s:?}",
                    shape[*axis]
                )));
            }
        }
        NodeKind::Reshape { src } => {
            let from: usize = shapes[src.index()].iter().product();
            let to: usize = shape.iter().product();
            if from != to {
                return Err(shape_error(format!(
                    "reshape failed: {from} elements into shape {shape:?}"
                )));
            }
        }
        _ => {}
    }
    Ok(())
}

fn launch_config(launch: &codegen::Launch, dims: &[i64]) -> Option<LaunchConfig> {
    let clamp = |x: i64, max: i64| x.clamp(1, max) as u32;
    let ceil = |a: i64, b: i64| (a + b - 1) / b;
    match launch {
        codegen::Launch::Grid { total } => {
            let t = dims[*total];
            (t > 0).then(|| LaunchConfig {
                grid_dim: (clamp(ceil(t, codegen::BLOCK as i64), 1 << 20), 1, 1),
                block_dim: (codegen::BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        codegen::Launch::Scalar { len } => {
            // Each thread folds at least 8 elements before another block helps.
            let per_block = i64::from(codegen::SCALAR_BLOCK) * 8;
            let blocks = ceil(dims[*len].max(1), per_block);
            Some(LaunchConfig {
                grid_dim: (clamp(blocks, i64::from(codegen::SCALAR_GRID)), 1, 1),
                block_dim: (codegen::SCALAR_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        codegen::Launch::Rows { total, len } => {
            let t = dims[*total];
            // A power of two between a warp and BLOCK, near the row length.
            let threads = (dims[*len].max(1) as u64)
                .next_power_of_two()
                .clamp(32, u64::from(codegen::BLOCK)) as u32;
            (t > 0).then(|| LaunchConfig {
                grid_dim: (clamp(t, 1 << 20), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        codegen::Launch::Tiled { m, n, batch } => {
            let (m, n) = (dims[*m], dims[*n]);
            let nb = batch.map_or(1, |b| dims[b]);
            let t = (codegen::TILE * codegen::MICRO) as i64;
            (m > 0 && n > 0 && nb > 0).then(|| LaunchConfig {
                grid_dim: (
                    clamp(ceil(n, t), 1 << 30),
                    clamp(ceil(m, t), 65535),
                    clamp(nb, 65535),
                ),
                block_dim: (codegen::TILE, codegen::TILE, 1),
                shared_mem_bytes: 0,
            })
        }
    }
}

/// What running a program needs from a device: byte buffers, a pointer
/// table, launches. `Gpu` is the real one; the tests also run the generated
/// kernels on an emulation of this interface (compiled for the CPU), so the
/// host logic below is checked on machines without a GPU.
#[doc(hidden)]
pub trait Machine {
    type Buf;
    /// A zeroed buffer of at least `bytes` bytes (at least one).
    fn alloc(&self, bytes: usize) -> Result<Self::Buf, Diagnostic>;
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf, Diagnostic>;
    fn size(&self, buf: &Self::Buf) -> usize;
    /// The address kernels see for `buf`.
    fn address(&self, buf: &Self::Buf) -> u64;
    /// Copies `bytes` into `buf` at byte `offset`, after every launch so
    /// far (the pointer table and the dim table change between launches).
    fn write(&self, buf: &mut Self::Buf, offset: usize, bytes: &[u8]) -> Result<(), Diagnostic>;
    /// Launches kernel `k` of the program with `(table, dims, err)`;
    /// `sizes` is the dim table's values (for the launch shape).
    fn launch(
        &self,
        k: usize,
        launch: &codegen::Launch,
        sizes: &[i64],
        args: [&Self::Buf; 3],
    ) -> Result<(), Diagnostic>;
    /// Waits for every launch, then copies a buffer back.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<u8>, Diagnostic>;
}

/// The GPU as a `Machine`: one stream, cudarc buffers.
struct Gpu<'a> {
    stream: &'a Arc<CudaStream>,
    functions: &'a [CudaFunction],
}

impl Machine for Gpu<'_> {
    type Buf = CudaSlice<u8>;

    fn alloc(&self, bytes: usize) -> Result<CudaSlice<u8>, Diagnostic> {
        self.stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(driver("allocation"))
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>, Diagnostic> {
        if bytes.is_empty() {
            return self.alloc(1);
        }
        self.stream.clone_htod(bytes).map_err(driver("copy"))
    }

    fn size(&self, buf: &CudaSlice<u8>) -> usize {
        buf.len()
    }

    fn address(&self, buf: &CudaSlice<u8>) -> u64 {
        buf.device_ptr(self.stream).0
    }

    fn write(
        &self,
        buf: &mut CudaSlice<u8>,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), Diagnostic> {
        self.stream
            .memcpy_htod(bytes, &mut buf.slice_mut(offset..offset + bytes.len()))
            .map_err(driver("copy"))
    }

    fn launch(
        &self,
        k: usize,
        launch: &codegen::Launch,
        sizes: &[i64],
        args: [&CudaSlice<u8>; 3],
    ) -> Result<(), Diagnostic> {
        let Some(cfg) = launch_config(launch, sizes) else {
            return Ok(());
        };
        let mut builder = self.stream.launch_builder(&self.functions[k]);
        builder.arg(args[0]).arg(args[1]).arg(args[2]);
        // SAFETY: every kernel takes (bufs, dims, err) as three device
        // pointers; `execute` passes the pointer table (the buffer of this
        // node and of every node it reads, each exactly its shape's
        // elements), the dim table and three error words. Reads are proven
        // (proofs re-checked by `execute`) or bounds-checked in the kernel.
        unsafe { builder.launch(cfg) }.map_err(driver("kernel launch"))?;
        Ok(())
    }

    fn download(&self, buf: &CudaSlice<u8>) -> Result<Vec<u8>, Diagnostic> {
        self.stream.synchronize().map_err(driver("execution"))?;
        self.stream.clone_dtoh(buf).map_err(driver("copy"))
    }
}

fn execute<F: Real>(
    graph: &Graph,
    c: &Compiled,
    dev: &Device,
    bound: &Bound,
    opts: RunOptions,
) -> Result<(Evaluation<F>, u64), Diagnostic> {
    let gpu = Gpu {
        stream: &dev.stream,
        functions: &c.functions,
    };
    execute_on(graph, &c.source, c.precision, &gpu, bound, opts)
}

/// The interpreter's diagnostic for a kernel's error word.
fn kernel_error(
    graph: &Graph,
    source: &codegen::Source,
    shapes: &[Vec<usize>],
    status: i64,
    err: [i64; 2],
) -> Diagnostic {
    let site = usize::try_from(status - 1)
        .ok()
        .and_then(|s| source.sites.get(s));
    match site {
        Some(codegen::Site::Index { node, dim }) => {
            let size = shapes
                .get(node.index())
                .and_then(|s| s.get(*dim))
                .map_or(err[1], |s| *s as i64);
            crate::interp::index_error(graph, *node, *dim, err[0], size)
        }
        Some(codegen::Site::RemByZero) => {
            Diagnostic::error(codes::INDEX_RANGE, "integer remainder by zero")
        }
        Some(codegen::Site::DivByZero) => {
            Diagnostic::error(codes::INDEX_RANGE, "integer division by zero")
        }
        Some(codegen::Site::Mixed(op)) => Diagnostic::error(
            codes::TYPE_MISMATCH,
            format!("internal error: `{}` on mixed scalar types", op.symbol()),
        ),
        None => failed(format!("internal error: kernel status {status}")),
    }
}
