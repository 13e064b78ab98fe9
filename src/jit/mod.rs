//! The Cranelift backend: every comprehension node becomes one native
//! function; everything else runs in Rust between the calls. It runs every
//! graph the interpreter runs and returns the same `interp::Evaluation`
//! (outputs and every node's value), so gradients, tests and the CLI work
//! unchanged with either backend.
//!
//! # Steps
//!
//! 1. **Plan** (`plan.rs`). For each `Comp` node: its loop levels (output
//!    indices, then reduced indices, each with a symbolic extent); its body and
//!    filter hash-consed into a DAG of *terms*, each with the interpreter's
//!    runtime type, the innermost loop level it depends on, and whether it is
//!    *safe* (cannot raise an error); and for every read index, whether it is
//!    proven in range (a loop variable or constant whose range lies inside the
//!    read dim for all sizes) or must be checked at run time. Every symbolic
//!    dim a kernel needs gets a slot in one dim table for the graph.
//! 2. **Translate** (`translate.rs`, one `Translator` per node, one
//!    `translate_*` method per construct). The entry block loads the dims and
//!    the buffer base pointers. The output loop nest stores each element at a
//!    running position; a reduction is an inner loop nest whose accumulators
//!    are frontend variables (registers), with the filter a branch, max/min
//!    keeping the first extreme, logsumexp as the interpreter's two passes
//!    (max, then the shifted sum), and the empty value chosen when nothing
//!    passed. `if` is control flow (a block per branch, the value a block
//!    parameter), never a `select` instruction, because a branch may read at
//!    indices valid only when it is taken. Safe terms are hoisted to the
//!    outermost loop they depend on; each term is evaluated once per scope.
//!    Math without a Cranelift instruction (exp, ln, tanh, pow, softplus,
//!    log_sigmoid, sigmoid, float-to-int) calls Rust `extern "C"` helpers
//!    registered as JIT symbols (`helpers.rs`), each the interpreter's own
//!    formula.
//! 3. **Cache.** The compiled module depends on the graph and the precision
//!    only: sizes are runtime arguments, so one `JitProgram` runs any batch
//!    size, and `compile` reuses the code of an identical graph compiled
//!    earlier in the process (a small bounded cache).
//! 4. **Run** (`JitProgram::run`). Evaluate the dim table from the bound sizes;
//!    then node by node: inputs are copied (converted to the precision),
//!    layout nodes (concat, slice, reshape) are memcpy in Rust, and each
//!    comprehension allocates its output buffer and calls its kernel, except
//!    a contraction `out[(b,) i, j] = sum(k) A[..] * B[..]` over plain index
//!    variables, which runs as `matrixmultiply`'s GEMM with strided operands
//!    (`gemm.rs`; its kernel is still compiled, for sizes where an operand
//!    does not fit and the interpreter's error must be raised). A
//!    kernel that meets an out-of-range index (or an integer division by
//!    zero) stores what it saw and returns a site code; `run` turns it into
//!    the interpreter's diagnostic (LC0506) with the same message.
//!
//! # Invariants
//!
//! * Generated code never reads or writes out of bounds: every buffer holds
//!   exactly the elements of its node's shape at these sizes (checked for
//!   inputs, by construction for the rest); writes go to the kernel's own
//!   buffer at positions below its element count; every read is either at
//!   loop indices (or constants) proven within the verified shapes — proofs
//!   re-checked numerically before each call — or bounds-checked before the
//!   load, in the interpreter's order.
//! * Generated code never traps: integer division is guarded (zero is an
//!   error, `-1` is negation), float-to-int goes through a helper, loads are
//!   in bounds.
//! * Same semantics as `interp`: the same evaluation order for everything
//!   that can fail, `if` evaluates only the taken branch, NaN propagation of
//!   maximum/minimum/clamp, first extreme for max/min, -inf for an empty or
//!   all -inf logsumexp, Euclidean `%` and `//`, and in-order summation, so
//!   values agree to rounding of the same operations in the same order —
//!   except GEMM contractions, which sum in blocked order (possibly with
//!   fused multiply-add): there values agree to the rounding of a sum.

mod gemm;
mod helpers;
mod plan;
mod translate;

use crate::bind::Bound;
use crate::interp::{Evaluation, Real, Tensor};
use crate::ir::{BinOp, DType, Dim, Graph, IdxVar, NodeId, NodeKind, RedOp};
use crate::syntax::{codes, Diagnostic};
use crate::tensor_io::TensorData;
use cranelift_codegen::ir::{types, AbiParam, Type};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use ndarray::{ArrayD, IxDyn};
use std::any::TypeId;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

/// The float type code is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    fn float_type(self) -> Type {
        match self {
            Precision::F32 => types::F32,
            Precision::F64 => types::F64,
        }
    }

    fn bytes(self) -> i64 {
        match self {
            Precision::F32 => 4,
            Precision::F64 => 8,
        }
    }

    /// The precision of a `Real` type (f32 or f64).
    pub fn of<F: Real>() -> Option<Precision> {
        if TypeId::of::<F>() == TypeId::of::<f32>() {
            Some(Precision::F32)
        } else if TypeId::of::<F>() == TypeId::of::<f64>() {
            Some(Precision::F64)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        }
    }
}

/// Where a kernel can fail; its code is the site's position + 1.
#[derive(Clone, Debug)]
enum ErrorSite {
    Index { node: NodeId, dim: usize },
    RemByZero,
    DivByZero,
    Mixed(BinOp),
}

/// `fn(bufs, dims, err) -> 0 | site + 1`.
type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, *mut i64) -> i64;

struct CompiledKernel {
    f: KernelFn,
    /// Unchecked read indices stay in range when each proof holds.
    proofs: Vec<plan::Proof>,
}

/// The native code of one graph at one precision.
struct Code {
    precision: Precision,
    /// Owns the executable memory the kernels point into; freed on drop.
    module: Option<JITModule>,
    kernels: Vec<Option<CompiledKernel>>,
    /// Comprehensions that run as GEMM when their operands fit (`gemm.rs`);
    /// their kernels stay compiled for when they do not.
    contractions: Vec<Option<gemm::Contraction>>,
    dims: Vec<Dim>,
    sites: Vec<ErrorSite>,
    compile_ms: f64,
}

// SAFETY: after `finalize_definitions` the module is never touched again
// (only dropped, which frees its memory); the kernels are plain function
// pointers into immutable code, callable from any thread.
unsafe impl Send for Code {}
unsafe impl Sync for Code {}

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.module.take() {
            // SAFETY: the only pointers into this memory are `kernels`, which
            // are dropped with `self`.
            unsafe { m.free_memory() };
        }
    }
}

/// A graph compiled to native code, runnable on any sizes.
pub struct JitProgram {
    graph: Graph,
    code: Arc<Code>,
    /// Code for the other precision, compiled on first use.
    other: Mutex<Option<Arc<Code>>>,
}

/// Compiles every comprehension of `graph` for `dtype`.
pub fn compile(graph: &Graph, dtype: Precision) -> Result<JitProgram, String> {
    crate::ir::verify::verify(graph)?;
    let code = cached_code(graph, dtype)?;
    Ok(JitProgram {
        graph: graph.clone(),
        code,
        other: Mutex::new(None),
    })
}

impl JitProgram {
    /// Milliseconds spent compiling this program's code (when it came from
    /// the cache, the time it took when first compiled).
    pub fn compile_ms(&self) -> f64 {
        self.code.compile_ms
    }

    pub fn precision(&self) -> Precision {
        self.code.precision
    }

    /// Evaluates the graph on bound inputs: the same `Evaluation` as
    /// `interp::evaluate`. Running in the other precision than compiled
    /// compiles it once, on first use.
    pub fn run<F: Real>(&self, bound: &Bound) -> Result<Evaluation<F>, Diagnostic> {
        let p = Precision::of::<F>().ok_or_else(|| {
            Diagnostic::error(codes::TENSOR_DTYPE, "the JIT runs in f32 or f64 only")
        })?;
        let code = if p == self.code.precision {
            self.code.clone()
        } else {
            let mut other = self.other.lock().unwrap_or_else(|e| e.into_inner());
            match &*other {
                Some(c) => c.clone(),
                None => {
                    let c = cached_code(&self.graph, p).map_err(|e| {
                        Diagnostic::error(
                            codes::TENSOR_DTYPE,
                            format!("JIT compilation failed: {e}"),
                        )
                    })?;
                    *other = Some(c.clone());
                    c
                }
            }
        };
        execute(&self.graph, &code, bound)
    }
}

/// The comprehensions this backend runs as GEMM (when their operands fit):
/// their values may differ from the interpreter's in summation order.
pub fn contraction_nodes(graph: &Graph) -> Vec<NodeId> {
    graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| match &n.kind {
            NodeKind::Comp(c) => gemm::recognise(graph, c, n.dtype).is_some(),
            _ => false,
        })
        .map(|(i, _)| NodeId(i as u32))
        .collect()
}

// ---- cache -------------------------------------------------------------------

const CACHE_CAPACITY: usize = 64;

type Cache = Mutex<Vec<(String, Precision, Arc<Code>)>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(Vec::new()))
}

/// What the code depends on: each node's kind, dtype and shape.
fn cache_key(graph: &Graph) -> String {
    let parts: Vec<_> = graph
        .nodes
        .iter()
        .map(|n| (&n.kind, n.dtype, &n.shape))
        .collect();
    format!("{parts:?}")
}

fn cached_code(graph: &Graph, p: Precision) -> Result<Arc<Code>, String> {
    let key = cache_key(graph);
    {
        let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = c.iter().position(|(k, q, _)| *q == p && *k == key) {
            let entry = c.remove(i);
            let code = entry.2.clone();
            c.push(entry); // most recently used last
            return Ok(code);
        }
    }
    let code = Arc::new(compile_code(graph, p)?);
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    if c.len() >= CACHE_CAPACITY {
        c.remove(0);
    }
    c.push((key, p, code.clone()));
    Ok(code)
}

// ---- compilation -------------------------------------------------------------

fn compile_code(graph: &Graph, p: Precision) -> Result<Code, String> {
    let start = Instant::now();
    let mut flags = settings::builder();
    let set = |f: &mut settings::Builder, k: &str, v: &str| {
        f.set(k, v).map_err(|e| format!("cranelift flag {k}: {e}"))
    };
    set(&mut flags, "opt_level", "speed")?;
    set(&mut flags, "use_colocated_libcalls", "false")?;
    set(&mut flags, "is_pic", "false")?;
    set(
        &mut flags,
        "enable_verifier",
        if cfg!(debug_assertions) {
            "true"
        } else {
            "false"
        },
    )?;
    let isa = cranelift_native::builder()
        .map_err(|e| format!("this machine is not supported by Cranelift: {e}"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("cranelift: {e}"))?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    helpers::register(&mut jb, p);
    let mut module = JITModule::new(jb);
    let declared = helpers::declare(&mut module, p)?;

    let mut dims = plan::DimTable::default();
    let mut sites = Vec::new();
    let mut ctx = module.make_context();
    let mut fctx = FunctionBuilderContext::new();
    let mut defined = Vec::new();
    let mut contractions: Vec<Option<gemm::Contraction>> =
        (0..graph.nodes.len()).map(|_| None).collect();
    for (i, node) in graph.nodes.iter().enumerate() {
        let NodeKind::Comp(comp) = &node.kind else {
            continue;
        };
        contractions[i] = gemm::recognise(graph, comp, node.dtype);
        let id = NodeId(i as u32);
        let mut levels: Vec<(IdxVar, Dim)> = comp
            .indices
            .iter()
            .copied()
            .zip(node.shape.iter().cloned())
            .collect();
        if let Some(r) = &comp.reduce {
            levels.extend(r.over.iter().cloned());
        }
        for d in &node.shape {
            dims.slot(d);
        }
        let mut proofs = Vec::new();
        let mut builder = plan::Builder {
            graph,
            loops: plan::Loops { levels: &levels },
            dims: &mut dims,
            proofs: &mut proofs,
            dag: plan::Dag::default(),
        };
        let filter = comp
            .reduce
            .as_ref()
            .and_then(|r| r.filter.as_ref())
            .map(|f| builder.add(f));
        let counts = comp.reduce.as_ref().is_some_and(|r| r.op == RedOp::Count);
        let body = (!counts).then(|| builder.add(&comp.body));
        let dag = builder.dag;

        let mut sig = module.make_signature();
        for _ in 0..3 {
            sig.params.push(AbiParam::new(types::I64));
        }
        sig.returns.push(AbiParam::new(types::I64));
        let func_id = module
            .declare_function(&format!("node{i}"), Linkage::Local, &sig)
            .map_err(|e| format!("%{i}: {e}"))?;
        ctx.func.signature = sig;
        let imported = helpers::import(&mut module, &declared, &mut ctx.func);
        let config = module.target_config();
        let fb = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        translate::Translator::new(
            translate::Kernel {
                graph,
                node: id,
                comp,
                dtype: node.dtype,
                precision: p,
                dag: &dag,
                levels: &levels,
                body,
                filter,
            },
            fb,
            &mut dims,
            imported,
            &mut sites,
        )
        .translate(config);
        module
            .define_function(func_id, &mut ctx)
            .map_err(|e| format!("%{i}: code generation failed: {e:?}"))?;
        module.clear_context(&mut ctx);
        defined.push((i, func_id, proofs));
    }
    module
        .finalize_definitions()
        .map_err(|e| format!("finalizing code: {e}"))?;
    let mut kernels: Vec<Option<CompiledKernel>> = (0..graph.nodes.len()).map(|_| None).collect();
    for (i, func_id, proofs) in defined {
        let ptr = module.get_finalized_function(func_id);
        // SAFETY: the function was declared with exactly this signature
        // (three pointer-sized integers in, one i64 out, default call
        // convention, which is the platform's C convention).
        let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
        kernels[i] = Some(CompiledKernel { f, proofs });
    }
    Ok(Code {
        precision: p,
        module: Some(module),
        kernels,
        contractions,
        dims: dims.dims,
        sites,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

// ---- running -----------------------------------------------------------------

/// A node's value while running: row-major, exactly its shape's elements.
enum Buf<F> {
    F(Vec<F>),
    I(Vec<i64>),
    B(Vec<u8>),
}

impl<F: Copy> Buf<F> {
    fn len(&self) -> usize {
        match self {
            Buf::F(v) => v.len(),
            Buf::I(v) => v.len(),
            Buf::B(v) => v.len(),
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::F(v) => v.as_mut_ptr() as *mut u8,
            Buf::I(v) => v.as_mut_ptr() as *mut u8,
            Buf::B(v) => v.as_mut_ptr(),
        }
    }

    fn zeroed(dtype: DType, n: usize) -> Buf<F>
    where
        F: Real,
    {
        match dtype {
            DType::Float => Buf::F(vec![F::zero(); n]),
            DType::Int => Buf::I(vec![0; n]),
            DType::Bool => Buf::B(vec![0; n]),
        }
    }

    /// The elements `[start, start + len)` of each of `outer` rows of `row`.
    fn gather(&self, outer: usize, row: usize, start: usize, len: usize, out: &mut Buf<F>) {
        macro_rules! go {
            ($a:expr, $b:expr) => {
                for o in 0..outer {
                    $b.extend_from_slice(&$a[o * row + start..o * row + start + len]);
                }
            };
        }
        match (self, out) {
            (Buf::F(a), Buf::F(b)) => go!(a, b),
            (Buf::I(a), Buf::I(b)) => go!(a, b),
            (Buf::B(a), Buf::B(b)) => go!(a, b),
            _ => {}
        }
    }

    fn empty_like(&self, capacity: usize) -> Buf<F> {
        match self {
            Buf::F(_) => Buf::F(Vec::with_capacity(capacity)),
            Buf::I(_) => Buf::I(Vec::with_capacity(capacity)),
            Buf::B(_) => Buf::B(Vec::with_capacity(capacity)),
        }
    }

    fn duplicate(&self) -> Buf<F> {
        match self {
            Buf::F(v) => Buf::F(v.clone()),
            Buf::I(v) => Buf::I(v.clone()),
            Buf::B(v) => Buf::B(v.clone()),
        }
    }

    fn into_tensor(self, shape: &[usize]) -> Result<Tensor<F>, ndarray::ShapeError> {
        let s = IxDyn(shape);
        Ok(match self {
            Buf::F(v) => Tensor::F(ArrayD::from_shape_vec(s, v)?),
            Buf::I(v) => Tensor::I(ArrayD::from_shape_vec(s, v)?),
            Buf::B(v) => Tensor::B(ArrayD::from_shape_vec(
                s,
                v.into_iter().map(|b| b != 0).collect(),
            )?),
        })
    }
}

fn shape_error(msg: impl Into<String>) -> Diagnostic {
    Diagnostic::error(codes::TENSOR_SHAPE, msg)
}

fn node_shape(graph: &Graph, bound: &Bound, id: NodeId) -> Result<Vec<usize>, Diagnostic> {
    graph
        .node(id)
        .shape
        .iter()
        .map(|d| match d.eval(&bound.sizes) {
            Some(v) if v >= 0 => Ok(v as usize),
            _ => Err(shape_error(format!(
                "the size {d} is unknown or negative for these inputs"
            ))),
        })
        .collect()
}

fn element_count(shape: &[usize]) -> Result<usize, Diagnostic> {
    shape
        .iter()
        .try_fold(1usize, |a, d| a.checked_mul(*d))
        .filter(|n| (*n as u128) * 8 < isize::MAX as u128)
        .ok_or_else(|| shape_error(format!("a node of shape {shape:?} is too large")))
}

fn execute<F: Real>(
    graph: &Graph,
    code: &Code,
    bound: &Bound,
) -> Result<Evaluation<F>, Diagnostic> {
    let dim_values: Vec<i64> = code
        .dims
        .iter()
        .map(|d| d.eval(&bound.sizes).unwrap_or(0))
        .collect();
    let n = graph.nodes.len();
    let mut bufs: Vec<Buf<F>> = Vec::with_capacity(n);
    // Base pointers of the buffers, by node; each is set once its buffer
    // exists and stays valid (the Vec's heap block never moves or grows).
    let mut ptrs: Vec<*mut u8> = vec![std::ptr::null_mut(); n];
    // The shape of each value as the interpreter reports it (an input keeps
    // the shape it was given).
    let mut shapes: Vec<Vec<usize>> = Vec::with_capacity(n);
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let shape = node_shape(graph, bound, id)?;
        let count = element_count(&shape)?;
        let (mut buf, value_shape) = match &node.kind {
            NodeKind::Input { .. } => {
                let b = bound.input(id).ok_or_else(|| {
                    Diagnostic::error(codes::MISSING_TENSOR, "an input was not bound")
                })?;
                if b.tensor.len() != count {
                    return Err(shape_error(format!(
                        "input `{}` does not match its shape",
                        b.name
                    )));
                }
                let buf = match (&b.tensor.data, node.dtype) {
                    (TensorData::F64(v), DType::Float) => Buf::F(
                        v.iter()
                            .map(|x| F::from_f64(*x).unwrap_or_else(F::nan))
                            .collect(),
                    ),
                    (TensorData::F32(v), DType::Float) => Buf::F(
                        v.iter()
                            .map(|x| F::from_f32(*x).unwrap_or_else(F::nan))
                            .collect(),
                    ),
                    (TensorData::I64(v), DType::Int) => Buf::I(v.clone()),
                    (TensorData::Bool(v), DType::Bool) => {
                        Buf::B(v.iter().map(|b| u8::from(*b)).collect())
                    }
                    _ => {
                        return Err(Diagnostic::error(
                            codes::TENSOR_DTYPE,
                            format!("input `{}` has the wrong dtype", b.name),
                        ))
                    }
                };
                (buf, b.tensor.shape.clone())
            }
            NodeKind::Comp(_) => {
                let kernel = code.kernels[i].as_ref().ok_or_else(|| {
                    shape_error(format!("internal error: %{i} has no compiled kernel"))
                })?;
                for proof in &kernel.proofs {
                    let dim = proof.dim.eval(&bound.sizes).unwrap_or(0);
                    let need = proof.bound.eval(&bound.sizes).unwrap_or(0).max(0);
                    if dim < need {
                        return Err(Diagnostic::error(
                            codes::INDEX_RANGE,
                            format!(
                                "index range {} = {need} exceeds the dim {} = {dim} it reads in %{i}",
                                proof.bound, proof.dim
                            ),
                        )
                        .with_help("these sizes break an assumption of the program's shapes"));
                    }
                }
                let mut buf = Buf::zeroed(node.dtype, count);
                ptrs[i] = buf.ptr();
                if let Some(con) = &code.contractions[i] {
                    // The operands' layout is their node shape at these sizes.
                    let operand_shape = |id: NodeId| node_shape(graph, bound, id).ok();
                    // SAFETY: every earlier node's buffer is at `ptrs`, row-major
                    // in its node shape (checked against `count` when stored),
                    // and floats of `code.precision`, which is `F`'s; this
                    // node's buffer holds `count` elements of `shape`.
                    let done = unsafe {
                        gemm::run(
                            con,
                            code.precision,
                            &bound.sizes,
                            &shape,
                            &operand_shape,
                            &ptrs,
                            ptrs[i],
                        )
                    };
                    if done {
                        ptrs[i] = buf.ptr();
                        bufs.push(buf);
                        shapes.push(shape);
                        continue;
                    }
                }
                let mut err = [0i64; 2];
                // SAFETY: `ptrs` holds the base of every earlier node's
                // buffer (each exactly its shape's elements at these sizes)
                // and of this node's own; `dim_values` has every slot of the
                // dim table. The kernel reads only proven or checked
                // positions and writes only its own buffer (module doc).
                let status =
                    unsafe { (kernel.f)(ptrs.as_ptr(), dim_values.as_ptr(), err.as_mut_ptr()) };
                if status != 0 {
                    return Err(kernel_error(graph, code, &shapes, status, err));
                }
                (buf, shape.clone())
            }
            NodeKind::Concat { axis, parts } => {
                let axis = *axis;
                let first = &shapes[parts[0].index()];
                let mut joined = first.clone();
                joined[axis] = 0;
                for p in parts {
                    let s = &shapes[p.index()];
                    let agrees = s.len() == first.len()
                        && s.iter()
                            .enumerate()
                            .all(|(a, d)| a == axis || *d == first[a]);
                    if !agrees {
                        return Err(shape_error(format!(
                            "concat failed: part shapes {first:?} and {s:?} differ off axis {axis}"
                        )));
                    }
                    joined[axis] += s[axis];
                }
                if joined != shape {
                    return Err(shape_error(format!(
                        "concat of shape {joined:?} where {shape:?} was expected"
                    )));
                }
                let outer: usize = shape[..axis].iter().product();
                let inner: usize = shape[axis + 1..].iter().product();
                let mut out = bufs[parts[0].index()].empty_like(count);
                for o in 0..outer {
                    for p in parts {
                        let rows = shapes[p.index()][axis] * inner;
                        bufs[p.index()].gather(1, 0, o * rows, rows, &mut out);
                    }
                }
                (out, shape.clone())
            }
            NodeKind::Slice { src, axis, start } => {
                let axis = *axis;
                let s = &shapes[src.index()];
                let begin = start.eval(&bound.sizes).unwrap_or(0);
                let fits = s.len() == shape.len()
                    && begin >= 0
                    && (begin as usize)
                        .checked_add(shape[axis])
                        .is_some_and(|e| e <= s[axis])
                    && s.iter()
                        .enumerate()
                        .all(|(a, d)| a == axis || *d == shape[a]);
                if !fits {
                    return Err(shape_error(format!(
                        "slice {begin}..{begin}+{} along axis {axis} does not fit a value of shape {s:?}",
                        shape[axis]
                    )));
                }
                let outer: usize = s[..axis].iter().product();
                let inner: usize = s[axis + 1..].iter().product();
                let src_buf = &bufs[src.index()];
                let mut out = src_buf.empty_like(count);
                src_buf.gather(
                    outer,
                    s[axis] * inner,
                    begin as usize * inner,
                    shape[axis] * inner,
                    &mut out,
                );
                (out, shape.clone())
            }
            NodeKind::Reshape { src } => {
                let from = &bufs[src.index()];
                if from.len() != count {
                    return Err(shape_error(format!(
                        "reshape failed: {} elements into shape {shape:?}",
                        from.len()
                    )));
                }
                (from.duplicate(), shape.clone())
            }
        };
        if buf.len() != count {
            return Err(shape_error(format!(
                "internal error: %{i} has {} elements, its shape {shape:?} {count}",
                buf.len()
            )));
        }
        ptrs[i] = buf.ptr();
        bufs.push(buf);
        shapes.push(value_shape);
    }
    let mut values = Vec::with_capacity(n);
    for (buf, shape) in bufs.into_iter().zip(&shapes) {
        values.push(
            buf.into_tensor(shape)
                .map_err(|e| shape_error(format!("internal shape error: {e}")))?,
        );
    }
    let outputs = graph
        .outputs
        .iter()
        .map(|(name, id)| {
            let x = match &values[id.index()] {
                Tensor::F(a) => a.iter().next().copied().unwrap_or_else(F::nan),
                _ => F::nan(),
            };
            (name.clone(), x)
        })
        .collect();
    Ok(Evaluation { outputs, values })
}

/// The interpreter's diagnostic for a kernel's failure.
fn kernel_error(
    graph: &Graph,
    code: &Code,
    shapes: &[Vec<usize>],
    status: i64,
    err: [i64; 2],
) -> Diagnostic {
    let site = usize::try_from(status - 1)
        .ok()
        .and_then(|s| code.sites.get(s));
    match site {
        Some(ErrorSite::Index { node, dim }) => {
            let name = graph
                .node(*node)
                .name
                .clone()
                .unwrap_or_else(|| format!("%{}", node.0));
            let size = shapes
                .get(node.index())
                .and_then(|s| s.get(*dim))
                .map_or(err[1], |s| *s as i64);
            Diagnostic::error(
                codes::INDEX_RANGE,
                format!(
                    "index {} is out of range for dim {dim} (size {size}) of `{name}`",
                    err[0]
                ),
            )
            .with_help("an int tensor used as an index (e.g. labels) holds a value outside the indexed dim")
        }
        Some(ErrorSite::RemByZero) => {
            Diagnostic::error(codes::INDEX_RANGE, "integer remainder by zero")
        }
        Some(ErrorSite::DivByZero) => {
            Diagnostic::error(codes::INDEX_RANGE, "integer division by zero")
        }
        Some(ErrorSite::Mixed(op)) => Diagnostic::error(
            codes::TYPE_MISMATCH,
            format!("internal error: `{}` on mixed scalar types", op.symbol()),
        ),
        None => Diagnostic::error(
            codes::INDEX_RANGE,
            format!("internal error: kernel status {status}"),
        ),
    }
}
