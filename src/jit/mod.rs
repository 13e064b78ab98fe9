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
//!    unchecked (a loop variable or constant whose range lies inside the read
//!    dim, proven for all sizes or assumed and verified before each call) or
//!    must be checked at run time. Every symbolic
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
//!    the interpreter's diagnostic (LC0506) with the same message. A node
//!    whose assumed bounds fail at these sizes runs on the interpreter
//!    instead (its members whole, when it is part of a streamed pass).
//!    Consecutive nodes of one shape with the same loops (elementwise, or one
//!    reduction over the same extents), none reading another and none able
//!    to fail, also compile as one *fusion group* kernel storing every member
//!    at each position (`Group`); a run whose next steps are exactly the
//!    group's members calls it instead of theirs.
//!
//! # Invariants
//!
//! * Generated code never reads or writes out of bounds: every buffer holds
//!   exactly the elements of its node's shape at these sizes (checked for
//!   inputs, by construction for the rest); writes go to the kernel's own
//!   buffer at positions below its element count; every read is either at
//!   loop indices (or constants) within the verified shapes — every proof
//!   checked numerically before each call, the node interpreted where one
//!   fails — or bounds-checked before the load, in the interpreter's order.
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
mod lower;
mod plan;
mod ranked;
mod run;
mod team;
mod translate;

use crate::stream;
pub use crate::stream::Streaming;
pub use run::RunOptions;

use crate::bind::Bound;
use crate::interp::{Evaluation, Real};
use crate::ir::{contraction, BinOp, Dim, Graph, IdxVar, NodeId, NodeKind, RedOp};
use crate::syntax::{codes, Diagnostic};
use cranelift_codegen::ir::{types, AbiParam, Type};
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use std::any::TypeId;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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

    /// Bytes of one float.
    pub fn bytes(self) -> i64 {
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

/// `fn(bufs, dims, err, ctl) -> 0 | site + 1` (`translate.rs`).
type KernelFn = unsafe extern "C" fn(*const *mut u8, *const i64, *mut i64, *const i64) -> i64;

struct CompiledKernel {
    f: KernelFn,
    /// Unchecked read indices stay in range when each proof holds.
    proofs: Vec<plan::Proof>,
    /// The nodes and dims of its `bufs` and `dims` tables (`translate.rs`).
    slots: translate::Slots,
    /// Its error sites: a status `s + 1` failed at `sites[s]`.
    sites: Vec<ErrorSite>,
}

/// Consecutive nodes of one shape running the same loops (elementwise, or
/// the same reduction over the same extents and filter), none reading
/// another, run as one loop nest that stores each member's element at each
/// position: the terms they share (the inputs' reads, common differences)
/// are computed once, a reduction's members fold one after another over rows
/// still in cache, and the inputs are read in one pass instead of one per
/// member.
/// Each member keeps its own kernel, for runs where the members are not
/// consecutive steps (streamed) or the group's assumed bounds fail.
/// A *row/column pair* is a group too: a row sum `r[i] = sum(j | f) a` and
/// a column sum `c[j] = sum(i | f) b` over the same domain and filter (a
/// pairwise term's gradient with respect to both of its sides), computed in
/// one pass: each `(i, j)` adds `a` to row `i` and `b` into a thread's own
/// buffer of column sums, and the threads' buffers are added in order.
struct Group {
    members: Vec<NodeId>,
    /// For a row/column pair: the row sum (the kernel's own node) and the
    /// column sum.
    pair: Option<(NodeId, NodeId)>,
    kernel: CompiledKernel,
}

/// The native code of one graph at one precision.
struct Code {
    precision: Precision,
    /// Owns the executable memory the kernels point into; freed on drop.
    module: Option<JITModule>,
    kernels: Vec<Option<CompiledKernel>>,
    /// Comprehensions that run as GEMM when their operands fit (`gemm.rs`);
    /// their kernels stay compiled for when they do not.
    contractions: Vec<Option<contraction::Contraction>>,
    /// Rank-filtered logsumexps that run sorted when their inputs allow
    /// (`ranked.rs`); their kernels stay compiled for when they do not.
    ranked: Vec<Option<ranked::Ranked>>,
    /// What may stream, and which kernels accumulate (`stream.rs`).
    stream: stream::Analysis,
    /// Kernels whose innermost loop runs in SIMD lanes (`translate/simd.rs`).
    vector: Vec<Option<translate::VectorLoop>>,
    /// Reductions to a scalar whose outermost reduced loop threads split
    /// (`translate::Kernel::split_red`, `run.rs`).
    split: Vec<bool>,
    /// Elementwise siblings computed by one kernel (`fusion_groups`), and
    /// for each node the group it starts, if any.
    groups: Vec<Group>,
    group_at: Vec<Option<usize>>,
    dims: Vec<Dim>,
    compile_ms: f64,
    /// How many kernels there are, and how many functions they call.
    counts: (usize, usize),
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
    /// The lowered graph the code computes (`lower.rs`).
    graph: Graph,
    /// For each node of the graph given to `compile`, its id in `graph`.
    map: Vec<NodeId>,
    code: Arc<Code>,
    /// Code for the other precision, compiled on first use.
    other: Mutex<Option<Arc<Code>>>,
    /// Buffers of earlier runs, reused by the next.
    pool: Mutex<run::Pool>,
    /// The last run's schedule, reused while sizes and options repeat.
    schedule: run::LastSchedule,
}

/// Compiles every comprehension of `graph` for `dtype`.
pub fn compile(graph: &Graph, dtype: Precision) -> Result<JitProgram, String> {
    crate::ir::verify::verify(graph)?;
    let (lowered, map) = lower::lower(graph);
    crate::ir::verify::verify(&lowered).map_err(|e| format!("internal error: lowering: {e}"))?;
    let code = cached_code(&lowered, dtype)?;
    Ok(JitProgram {
        graph: lowered,
        map,
        code,
        other: Mutex::new(None),
        pool: Mutex::new(run::Pool::default()),
        schedule: Mutex::new(None),
    })
}

impl JitProgram {
    /// Milliseconds spent compiling this program's code (when it came from
    /// the cache, the time it took when first compiled).
    pub fn compile_ms(&self) -> f64 {
        self.code.compile_ms
    }

    /// How many kernels the code has, and how many native functions they
    /// call: kernels that compute the same thing on other nodes (a layer's
    /// or a truncation's copy of a term) share one function.
    pub fn kernel_counts(&self) -> (usize, usize) {
        self.code.counts
    }

    pub fn precision(&self) -> Precision {
        self.code.precision
    }

    /// Evaluates the graph on bound inputs: the same `Evaluation` as
    /// `interp::evaluate`. Running in the other precision than compiled
    /// compiles it once, on first use.
    pub fn run<F: Real>(&self, bound: &Bound) -> Result<Evaluation<F>, Diagnostic> {
        self.run_with(bound, RunOptions::full())
    }

    /// `run` with options: threads, streaming, and whether every node's
    /// value is kept (`RunOptions::lean` keeps the outputs and gradients).
    pub fn run_with<F: Real>(
        &self,
        bound: &Bound,
        opts: RunOptions,
    ) -> Result<Evaluation<F>, Diagnostic> {
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
        let e = run::execute::<F>(&self.graph, &code, bound, opts, &self.pool, &self.schedule)?;
        // Values by the ids of the graph given to `compile`: each moved out
        // at its last use (several ids may share a lowered node).
        let mut uses = vec![0usize; e.values.len()];
        for l in &self.map {
            uses[l.index()] += 1;
        }
        let mut slots: Vec<Option<crate::interp::Tensor<F>>> =
            e.values.into_iter().map(Some).collect();
        let values = self
            .map
            .iter()
            .map(|l| {
                let i = l.index();
                uses[i] -= 1;
                let value = if uses[i] == 0 {
                    slots[i].take()
                } else {
                    slots[i].clone()
                };
                value.expect("a lowered node's value is moved out at its last use only")
            })
            .collect();
        Ok(Evaluation {
            outputs: e.outputs,
            values,
        })
    }
}

impl JitProgram {
    /// The nodes whose values may differ from the interpreter's in reduction
    /// order: contractions run as GEMM, sums, logsumexps and max/min
    /// whose innermost loop runs in SIMD lanes (partials per lane), and the
    /// rank-filtered pair reductions run sorted (`ranked_nodes`). Their
    /// values agree to the rounding of a sum (for max/min: the same value,
    /// the sign of a zero aside), not of the same operations in order.
    pub fn reordered_nodes(&self) -> Vec<NodeId> {
        let code = &self.code;
        let ids: Vec<NodeId> = (0..self.graph.nodes.len())
            .filter(|&i| {
                code.contractions[i].is_some()
                    || self.reads_ranked(i)
                    || code.split[i]
                    || code
                        .groups
                        .iter()
                        .any(|g| g.pair.is_some_and(|(_, c)| c.index() == i))
                    || matches!(
                        code.vector[i],
                        Some(
                            translate::VectorLoop::Sum
                                | translate::VectorLoop::LogSumExp
                                | translate::VectorLoop::Extreme
                        )
                    )
            })
            .map(|i| NodeId(i as u32))
            .collect();
        lower::original_ids(&self.map, &ids)
    }

    /// The pair reductions filtered by a rank comparison that run as a sort
    /// and a running logsumexp (`ranked.rs`): each reads a `Ranked` node of
    /// the lowered graph.
    pub fn ranked_nodes(&self) -> Vec<NodeId> {
        let ids: Vec<NodeId> = (0..self.graph.nodes.len())
            .filter(|&i| self.reads_ranked(i))
            .map(|i| NodeId(i as u32))
            .collect();
        lower::original_ids(&self.map, &ids)
    }

    /// Whether lowered node `i` reads a `Ranked` node.
    fn reads_ranked(&self, i: usize) -> bool {
        match &self.graph.nodes[i].kind {
            NodeKind::Comp(c) => {
                let mut reads = c.body.reads();
                if let Some(f) = c.reduce.as_ref().and_then(|r| r.filter.as_ref()) {
                    reads.extend(f.reads());
                }
                reads.iter().any(|r| self.code.ranked[r.index()].is_some())
            }
            _ => false,
        }
    }

    /// How many kernels run their innermost loop in SIMD lanes.
    pub fn vectorised_kernels(&self) -> usize {
        self.code.vector.iter().filter(|v| v.is_some()).count()
    }

    /// The fusion groups (`Group`): elementwise nodes computed by one
    /// kernel when they are consecutive steps of a run.
    pub fn fused_groups(&self) -> Vec<Vec<NodeId>> {
        self.code
            .groups
            .iter()
            .map(|g| lower::original_ids(&self.map, &g.members))
            .collect()
    }

    /// The square nodes whose diagonal the code reads as a vector of its own
    /// (`lower::read_matrix_diagonals`).
    pub fn diagonal_vectors(&self) -> Vec<NodeId> {
        let sources: Vec<NodeId> = self
            .graph
            .nodes
            .iter()
            .filter_map(|node| match &node.kind {
                NodeKind::Comp(crate::ir::Comp {
                    indices,
                    reduce: None,
                    body: crate::ir::Expr::Read { node, at },
                }) if indices.len() == 1
                    && at.len() == 2
                    && at.iter().all(|e| *e == crate::ir::Expr::Index(indices[0])) =>
                {
                    Some(*node)
                }
                _ => None,
            })
            .collect();
        lower::original_ids(&self.map, &sources)
    }

    /// Whether node `id`'s kernel runs in SIMD lanes.
    pub fn is_vectorised(&self, id: NodeId) -> bool {
        self.map
            .get(id.index())
            .and_then(|l| self.code.vector.get(l.index()))
            .is_some_and(|v| v.is_some())
    }
}

impl JitProgram {
    /// The contraction pairs `sum(j) M[i, j] X[j, k]` and `sum(i) M[i, j]
    /// X[i, k]`, read only by their sum, that a run with `opts` at the bound
    /// sizes computes as one GEMM over `M + Mᵀ` (`run::TwoSided`; left,
    /// right), where `M` is whole when the run reaches them.
    pub fn two_sided_products(
        &self,
        bound: &Bound,
        opts: RunOptions,
    ) -> Result<Vec<(NodeId, NodeId)>, Diagnostic> {
        let pairs = run::two_sided_pairs(&self.graph, &self.code, bound, opts)?;
        let back = |id: NodeId| lower::original_ids(&self.map, &[id]).first().copied();
        Ok(pairs
            .into_iter()
            .filter_map(|(l, r)| Some((back(l)?, back(r)?)))
            .collect())
    }
}

/// One pass of a streamed run (`JitProgram::schedule`).
#[derive(Clone, Debug, PartialEq)]
pub struct PassReport {
    /// The row dim's size, and the rows per block.
    pub rows: usize,
    pub tile_rows: usize,
    /// Nodes kept only as tiles of `tile_rows` rows, recomputed per pass.
    pub streamed: Vec<NodeId>,
    /// Every node computed block by block, streamed or not.
    pub members: Vec<NodeId>,
}

impl JitProgram {
    /// The passes a run with `opts` makes at the bound sizes (none when
    /// nothing streams).
    pub fn schedule(&self, bound: &Bound, opts: RunOptions) -> Result<Vec<PassReport>, Diagnostic> {
        let steps = run::steps(&self.graph, &self.code, bound, opts)?;
        // Lowered ids back to the caller's; nodes lowering added are left out.
        let back = |ids: Vec<NodeId>| -> Vec<NodeId> { lower::original_ids(&self.map, &ids) };
        Ok(steps
            .into_iter()
            .filter_map(|s| match s {
                stream::Step::Pass(p) => Some(PassReport {
                    rows: p.rows,
                    tile_rows: p.tile_rows,
                    streamed: back(p.streamed),
                    members: back(p.nodes.iter().map(|(id, _)| *id).collect()),
                }),
                stream::Step::Whole(_) => None,
            })
            .collect())
    }
}

/// How a compile error on a machine Cranelift cannot target begins.
pub const UNSUPPORTED_MACHINE: &str = "this machine is not supported by Cranelift";

/// The comprehensions this backend runs as GEMM (when their operands fit):
/// their values may differ from the interpreter's in summation order.
pub fn contraction_nodes(graph: &Graph) -> Vec<NodeId> {
    let (lowered, map) = lower::lower(graph);
    let gemm: Vec<NodeId> = lowered
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| match &n.kind {
            NodeKind::Comp(c) => contraction::recognise(&lowered, c, n.dtype).is_some(),
            _ => false,
        })
        .map(|(i, _)| NodeId(i as u32))
        .collect();
    lower::original_ids(&map, &gemm)
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
        .map_err(|e| format!("{UNSUPPORTED_MACHINE}: {e}"))?
        .finish(settings::Flags::new(flags))
        .map_err(|e| format!("cranelift: {e}"))?;
    let mut jb = JITBuilder::with_isa(isa, default_libcall_names());
    helpers::register(&mut jb, p);
    let mut module = JITModule::new(jb);
    let declared = helpers::declare(&mut module, p)?;

    let analysis = stream::analyse(graph);
    let mut e = Emitter {
        graph,
        p,
        module,
        declared,
        dims: plan::DimTable::default(),
        ctx: None,
        fctx: FunctionBuilderContext::new(),
        pending: Vec::new(),
        shared: HashMap::new(),
    };
    e.ctx = Some(e.module.make_context());
    let mut defined = Vec::new();
    let mut contractions: Vec<Option<contraction::Contraction>> =
        (0..graph.nodes.len()).map(|_| None).collect();
    let mut ranked = vec![None; graph.nodes.len()];
    let mut vector = vec![None; graph.nodes.len()];
    let mut split = vec![false; graph.nodes.len()];
    for (i, node) in graph.nodes.iter().enumerate() {
        let NodeKind::Comp(comp) = &node.kind else {
            continue;
        };
        contractions[i] = contraction::recognise(graph, comp, node.dtype);
        ranked[i] = ranked::recognise(graph, node);
        split[i] = analysis.ranged_red[i].is_none() && splits(comp, node.dtype);
        let spec = Spec {
            id: NodeId(i as u32),
            also: Vec::new(),
            column: None,
            ranged_red: analysis.ranged_red[i],
            split_red: split[i],
        };
        let d = e
            .define(&format!("node{i}"), &spec)?
            .ok_or_else(|| format!("internal error: %{i} not compiled"))?;
        vector[i] = d.vector;
        defined.push((i, d));
    }
    // Elementwise siblings fused: one loop nest storing every member.
    let mut group_specs = Vec::new();
    for members in fusion_groups(graph, &analysis) {
        let spec = Spec {
            id: members[0],
            also: members[1..].to_vec(),
            column: None,
            ranged_red: None,
            split_red: false,
        };
        let name = format!("group{}", members[0].index());
        if let Some(d) = e.define(&name, &spec)? {
            group_specs.push((members, None, d));
        }
    }
    for (row, col) in row_column_pairs(graph, &group_specs) {
        let spec = Spec {
            id: row,
            also: Vec::new(),
            column: Some(col),
            ranged_red: None,
            split_red: false,
        };
        let name = format!("pair{}", row.index());
        if let Some(d) = e.define(&name, &spec)? {
            let mut members = vec![row, col];
            members.sort();
            group_specs.push((members, Some((row, col)), d));
        }
    }
    let Emitter {
        mut module,
        dims,
        pending,
        ..
    } = e;
    let kernel_count = defined.len() + group_specs.len();
    let function_count = {
        let mut funcs: Vec<_> = defined
            .iter()
            .map(|(_, d)| d.func)
            .chain(group_specs.iter().map(|g| g.2.func))
            .collect();
        funcs.sort();
        funcs.dedup();
        funcs.len()
    };
    compile_pending(&mut module, pending)?;
    module
        .finalize_definitions()
        .map_err(|e| format!("finalizing code: {e}"))?;
    let finalized = |module: &JITModule, d: Defined| {
        let ptr = module.get_finalized_function(d.func);
        // SAFETY: the function was declared with exactly this signature
        // (four pointer-sized integers in, one i64 out, default call
        // convention, which is the platform's C convention).
        let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(ptr) };
        CompiledKernel {
            f,
            proofs: d.proofs,
            slots: d.slots,
            sites: d.sites,
        }
    };
    let mut kernels: Vec<Option<CompiledKernel>> = (0..graph.nodes.len()).map(|_| None).collect();
    for (i, d) in defined {
        kernels[i] = Some(finalized(&module, d));
    }
    let mut group_at = vec![None; graph.nodes.len()];
    let mut groups = Vec::new();
    for (members, pair, d) in group_specs {
        group_at[members[0].index()] = Some(groups.len());
        groups.push(Group {
            members,
            pair,
            kernel: finalized(&module, d),
        });
    }
    Ok(Code {
        precision: p,
        module: Some(module),
        kernels,
        contractions,
        ranked,
        stream: analysis,
        vector,
        split,
        groups,
        group_at,
        dims: dims.dims,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
        counts: (kernel_count, function_count),
    })
}

/// What one kernel computes: node `id`'s comprehension, and with it the
/// elementwise nodes `also` (a fusion group; their index variables renamed
/// to `id`'s).
struct Spec {
    id: NodeId,
    also: Vec<NodeId>,
    /// A column sum over `id`'s domain (`Group::column`).
    column: Option<NodeId>,
    ranged_red: Option<usize>,
    split_red: bool,
}

/// A kernel translated: its function and what calling it needs.
struct Defined {
    func: cranelift_module::FuncId,
    /// The proofs its unchecked reads need.
    proofs: Vec<plan::Proof>,
    /// How it vectorised.
    vector: Option<translate::VectorLoop>,
    slots: translate::Slots,
    sites: Vec<ErrorSite>,
}

/// The state of compiling one graph's kernels into one module.
struct Emitter<'g> {
    graph: &'g Graph,
    p: Precision,
    module: JITModule,
    declared: helpers::Declared,
    dims: plan::DimTable,
    ctx: Option<cranelift_codegen::Context>,
    fctx: FunctionBuilderContext,
    /// Functions translated and not yet compiled (`compile_pending`).
    pending: Vec<(cranelift_module::FuncId, cranelift_codegen::ir::Function)>,
    /// The pending functions by the hash of their code: a kernel translated
    /// to the same code as an earlier one (the same computation on other
    /// nodes: a layer's or a width's copy of a term) calls that one's.
    shared: HashMap<u64, Vec<usize>>,
}

impl Emitter<'_> {
    /// Plans, translates and defines one kernel function. A group whose
    /// members can raise an error is not defined (`None`): the interpreter
    /// raises the first member's errors before the second's, and the
    /// group's elements interleave them.
    fn define(&mut self, name: &str, spec: &Spec) -> Result<Option<Defined>, String> {
        let graph = self.graph;
        let i = spec.id.index();
        let node = graph.node(spec.id);
        let NodeKind::Comp(comp) = &node.kind else {
            return Err(format!("internal error: %{i} is not a comprehension"));
        };
        let levels = comp.levels(&node.shape);
        for d in &node.shape {
            self.dims.slot(d);
        }
        let mut proofs = Vec::new();
        let mut builder = plan::Builder {
            graph,
            loops: plan::Loops { levels: &levels },
            dims: &mut self.dims,
            proofs: &mut proofs,
            dag: plan::Dag::default(),
            guards: Vec::new(),
            conditional: 0,
        };
        let filter_expr = comp.reduce.as_ref().and_then(|r| r.filter.as_ref());
        let filter = filter_expr.map(|f| builder.add(f));
        // The body is evaluated only where the filter passes.
        if let Some(f) = filter_expr {
            plan::value_vars(f, &mut builder.guards);
            builder.conditional += 1;
        }
        let counts = comp.reduce.as_ref().is_some_and(|r| r.op == RedOp::Count);
        let body = (!counts).then(|| builder.add(&comp.body));
        let mut also = Vec::new();
        for &m in &spec.also {
            let NodeKind::Comp(c) = &graph.node(m).kind else {
                return Err(format!(
                    "internal error: %{} is not a comprehension",
                    m.index()
                ));
            };
            let also_levels = c.levels(&graph.node(m).shape);
            let rename: std::collections::BTreeMap<IdxVar, crate::ir::Expr> = also_levels
                .iter()
                .zip(&levels)
                .map(|((from, _), (to, _))| (*from, crate::ir::Expr::Index(*to)))
                .collect();
            also.push((m, builder.add(&c.body.subst(&rename))));
        }
        let column = match spec.column {
            Some(m) => {
                let NodeKind::Comp(c) = &graph.node(m).kind else {
                    return Err(format!(
                        "internal error: %{} is not a comprehension",
                        m.index()
                    ));
                };
                let rename = pair_renaming(comp, c);
                Some((m, builder.add(&c.body.subst(&rename))))
            }
            None => None,
        };
        let dag = builder.dag;
        let safe = |t: Option<usize>| t.is_some_and(|t| dag.terms[t].safe);
        let filter_safe = filter.is_none_or(|f| dag.terms[f].safe);
        let fused = also.iter().chain(&column);
        if (!also.is_empty() || column.is_some())
            && !(safe(body) && filter_safe && fused.clone().all(|(_, t)| safe(Some(*t))))
        {
            return Ok(None);
        }

        let module = &mut self.module;
        let mut sig = module.make_signature();
        for _ in 0..4 {
            sig.params.push(AbiParam::new(types::I64));
        }
        sig.returns.push(AbiParam::new(types::I64));
        let func_id = module
            .declare_function(name, Linkage::Local, &sig)
            .map_err(|e| format!("%{i}: {e}"))?;
        let ctx = self.ctx.as_mut().expect("a context");
        ctx.func.signature = sig;
        let imported = helpers::import(module, &self.declared, &mut ctx.func);
        let config = module.target_config();
        let fb = FunctionBuilder::new(&mut ctx.func, &mut self.fctx);
        let mut sites = Vec::new();
        let translator = translate::Translator::new(
            translate::Kernel {
                graph,
                node: spec.id,
                comp,
                dtype: node.dtype,
                precision: self.p,
                dag: &dag,
                levels: &levels,
                body,
                filter,
                ranged_red: spec.ranged_red,
                split_red: spec.split_red,
                also,
                column,
            },
            fb,
            &mut self.dims,
            imported,
            &mut sites,
        );
        let vector = translator.vector_loop();
        let slots = translator.slots();
        if std::env::var_os("LOSSC_JIT_PROFILE").is_some() {
            eprintln!("profile: {name} simd {vector:?}");
        }
        translator.translate(config);
        let disasm = std::env::var_os("LOSSC_JIT_DISASM").is_some();
        ctx.set_disasm(disasm);
        // The IR as translated, then as Cranelift's optimiser left it.
        let clif = std::env::var_os("LOSSC_JIT_CLIF").is_some();
        if clif {
            eprintln!("; clif {name}\n{}", ctx.func.display());
        }
        let defined = |func| Defined {
            func,
            proofs,
            vector,
            slots,
            sites,
        };
        if !(clif || disasm) {
            // Compiled with the others, in parallel (`compile_pending`),
            // unless an earlier kernel has this code.
            let func = std::mem::replace(&mut ctx.func, cranelift_codegen::ir::Function::new());
            module.clear_context(ctx);
            let key = {
                let mut h = rustc_hash::FxHasher::default();
                func.stencil.hash(&mut h);
                h.finish()
            };
            let same = self.shared.entry(key).or_default();
            let pending = &self.pending;
            if let Some(&j) = same.iter().find(|&&j| {
                let f = &pending[j].1;
                f.stencil == func.stencil && f.params == func.params
            }) {
                return Ok(Some(defined(pending[j].0)));
            }
            same.push(self.pending.len());
            self.pending.push((func_id, func));
            return Ok(Some(defined(func_id)));
        }
        module
            .define_function(func_id, ctx)
            .map_err(|e| format!("%{i}: code generation failed: {e:?}"))?;
        if clif {
            eprintln!("; optimised clif {name}\n{}", ctx.func.display());
        }
        if disasm {
            if let Some(code) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
                eprintln!("; {name}\n{code}");
            }
        }
        module.clear_context(ctx);
        Ok(Some(defined(func_id)))
    }
}

/// Cranelift's code generation of the translated functions, split over the
/// machine's cores (each function on its own `Context`; the ISA is shared),
/// then defined in the module in their order.
fn compile_pending(
    module: &mut JITModule,
    pending: Vec<(cranelift_module::FuncId, cranelift_codegen::ir::Function)>,
) -> Result<(), String> {
    type Compiled = Result<(u64, Vec<u8>, Vec<cranelift_module::ModuleReloc>), String>;
    let compile = |isa: &dyn cranelift_codegen::isa::TargetIsa,
                   id: cranelift_module::FuncId,
                   func: cranelift_codegen::ir::Function|
     -> Compiled {
        let mut ctx = cranelift_codegen::Context::for_function(func);
        let mut plane = cranelift_codegen::control::ControlPlane::default();
        let alignment = ctx
            .compile(isa, &mut plane)
            .map_err(|e| format!("code generation failed: {:?}", e.inner))?
            .buffer
            .alignment;
        let alignment = u64::from(alignment);
        let code = ctx.compiled_code().expect("just compiled");
        let bytes = code.code_buffer().to_vec();
        let relocs = code
            .buffer
            .relocs()
            .iter()
            .map(|r| cranelift_module::ModuleReloc::from_mach_reloc(r, &ctx.func, id))
            .collect();
        Ok((alignment, bytes, relocs))
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(pending.len().max(1));
    // Function `j` goes to share `j % threads`; results come back in order.
    type Share = Vec<(
        usize,
        cranelift_module::FuncId,
        cranelift_codegen::ir::Function,
    )>;
    let mut shares: Vec<Share> = (0..threads).map(|_| Vec::new()).collect();
    let ids: Vec<cranelift_module::FuncId> = pending.iter().map(|(id, _)| *id).collect();
    for (j, (id, f)) in pending.into_iter().enumerate() {
        shares[j % threads].push((j, id, f));
    }
    let isa = module.isa();
    let run = |share: Share| -> Vec<(usize, Compiled)> {
        share
            .into_iter()
            .map(|(j, id, f)| (j, compile(isa, id, f)))
            .collect()
    };
    let mut results: Vec<Option<Compiled>> = (0..ids.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Compiled)>> = if threads == 1 {
        shares.into_iter().map(run).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| scope.spawn(move || run(share)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a compile thread panicked"))
                .collect()
        })
    };
    for (j, r) in done.into_iter().flatten() {
        results[j] = Some(r);
    }
    let results = results
        .into_iter()
        .map(|r| r.expect("every function compiled"));
    for (id, result) in ids.into_iter().zip(results) {
        let (alignment, bytes, relocs) = result?;
        module
            .define_function_bytes(id, alignment, &bytes, &relocs)
            .map_err(|e| format!("defining compiled code: {e:?}"))?;
    }
    Ok(())
}

/// Runs of consecutive float nodes with the same loops (`Graph::same_loops`),
/// none reading another, none accumulating or run as GEMM: each becomes a
/// `Group` (at most `MAX_GROUP` members).
fn fusion_groups(graph: &Graph, analysis: &stream::Analysis) -> Vec<Vec<NodeId>> {
    const MAX_GROUP: usize = 8;
    graph.sibling_groups(MAX_GROUP, |id| {
        let node = graph.node(id);
        match &node.kind {
            NodeKind::Comp(c) => {
                node.dtype == crate::ir::DType::Float
                    && !node.shape.is_empty()
                    && analysis.ranged_red[id.index()].is_none()
                    && contraction::recognise(graph, c, node.dtype).is_none()
                    && ranked::recognise(graph, node).is_none()
            }
            _ => false,
        }
    })
}

/// The renaming that turns a column sum `c[j'] = sum(i') ..` into the row
/// sum `r[i] = sum(j) ..`'s variables: `j' -> j`, `i' -> i`.
fn pair_renaming(
    row: &crate::ir::Comp,
    col: &crate::ir::Comp,
) -> std::collections::BTreeMap<IdxVar, crate::ir::Expr> {
    let mut m = std::collections::BTreeMap::new();
    if let (Some(rr), Some(rc)) = (&row.reduce, &col.reduce) {
        if let (Some(j), Some(j2), Some(i), Some(i2)) = (
            rr.over.first(),
            col.indices.first(),
            row.indices.first(),
            rc.over.first(),
        ) {
            m.insert(*j2, crate::ir::Expr::Index(j.0));
            m.insert(i2.0, crate::ir::Expr::Index(*i));
        }
    }
    m
}

/// Consecutive (row sum, column sum) pairs over one domain (`Group`): both
/// float `sum`s with empty value 0 over one index, `r[i] = sum(j | f)` and
/// `c[j] = sum(i | f)` with the same extents and filter, neither reading
/// the other, in no other group. A column sum that a streamed pass would
/// accumulate block by block pairs too: the pair runs only where both are
/// whole steps, and a whole sum with empty value 0 needs no counts.
fn row_column_pairs(
    graph: &Graph,
    taken: &[(Vec<NodeId>, Option<(NodeId, NodeId)>, Defined)],
) -> Vec<(NodeId, NodeId)> {
    let sum1 = |id: NodeId| match &graph.node(id).kind {
        NodeKind::Comp(c) => {
            let node = graph.node(id);
            let ok = node.dtype == crate::ir::DType::Float
                && node.shape.len() == 1
                && !taken.iter().any(|g| g.0.contains(&id))
                && c.reduce
                    .as_ref()
                    .is_some_and(|r| r.op == RedOp::Sum && r.empty == 0.0 && r.over.len() == 1);
            ok.then_some(c)
        }
        _ => None,
    };
    let is_pair = |row: NodeId, col: NodeId| -> bool {
        let (Some(r), Some(c)) = (sum1(row), sum1(col)) else {
            return false;
        };
        let (rr, rc) = (
            r.reduce.as_ref().expect("a sum"),
            c.reduce.as_ref().expect("a sum"),
        );
        let rename = pair_renaming(r, c);
        graph.node(row).shape[0] == rc.over[0].1
            && graph.node(col).shape[0] == rr.over[0].1
            && match (&rr.filter, &rc.filter) {
                (None, None) => true,
                (Some(fr), Some(fc)) => *fr == fc.subst(&rename),
                _ => false,
            }
            && !graph.operands(row).contains(&col)
            && !graph.operands(col).contains(&row)
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < graph.nodes.len() {
        let (a, b) = (NodeId(i as u32), NodeId(i as u32 + 1));
        if is_pair(a, b) {
            out.push((a, b));
            i += 2;
        } else if is_pair(b, a) {
            out.push((b, a));
            i += 2;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether threads may split a reduction to a scalar by its outermost
/// reduced index: a float `sum`, `logsumexp`, `max` or `min` whose empty value
/// is the identity of combining the blocks' values (so a block where nothing
/// passed changes nothing).
fn splits(comp: &crate::ir::Comp, dtype: crate::ir::DType) -> bool {
    let Some(r) = &comp.reduce else {
        return false;
    };
    comp.indices.is_empty()
        && dtype == crate::ir::DType::Float
        && match r.op {
            RedOp::Sum => r.empty == 0.0,
            RedOp::LogSumExp | RedOp::Max => r.empty == f64::NEG_INFINITY,
            RedOp::Min => r.empty == f64::INFINITY,
            _ => false,
        }
}

/// The interpreter's diagnostic for a kernel's failure.
fn kernel_error(
    graph: &Graph,
    kernel: &CompiledKernel,
    shapes: &[Vec<usize>],
    status: i64,
    err: [i64; 2],
) -> Diagnostic {
    let site = usize::try_from(status - 1)
        .ok()
        .and_then(|s| kernel.sites.get(s));
    match site {
        Some(ErrorSite::Index { node, dim }) => {
            let size = shapes
                .get(node.index())
                .and_then(|s| s.get(*dim))
                .map_or(err[1], |s| *s as i64);
            crate::interp::index_error(graph, *node, *dim, err[0], size)
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
