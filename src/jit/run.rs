//! Running compiled code: the steps of `stream::plan`, each node computed
//! whole or a pass over blocks of rows; kernels split by rows across threads;
//! buffers freed after their last reader in a lean run.
//!
//! * A whole comprehension allocates its buffer and runs its kernel over all
//!   rows (split into one chunk of rows per thread when the work pays for a
//!   thread), or its contraction through GEMM.
//! * A pass allocates a tile of `tile_rows` rows per streamed node; for each
//!   block of rows it points each streamed node's base at its tile *minus*
//!   the block's first row (a virtual base: the kernels index rows
//!   `lo .. hi` only, which land in the tile), then runs its members in graph
//!   order: row-local ones on the block's rows, accumulating ones on the
//!   block's part of their reduction, added to their output. After the last
//!   block the accumulating outputs are finalised (`finalize`).
//! * Errors: chunks run in row order and the first failing chunk's error is
//!   reported, so a whole node reports the interpreter's first error. In a
//!   pass, errors come block by block (the same diagnostic, possibly for a
//!   later element than the interpreter's first).

use super::team::Team;
use super::{gemm, kernel_error, ranked, Code, CompiledKernel, Group, Precision};
use crate::bind::Bound;
use crate::interp::{Evaluation, Real, Tensor};
use crate::ir::{BinOp, Comp, DType, Expr, Graph, NodeId, NodeKind, RedOp};
use crate::stream::{self, Mode, Pass, Step, Streaming};
use crate::syntax::{codes, Diagnostic};
use crate::tensor_io::TensorData;
use ndarray::{ArrayD, IxDyn};
use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// How to run: threads, streaming, and whether to keep every node's value.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Threads for kernels and GEMM (the caller and `threads - 1` kernel
    /// threads, `team.rs`).
    pub threads: usize,
    pub streaming: Streaming,
    /// Rows per streamed block (default: tiles of about 32 MiB, at least 256 rows).
    pub tile_rows: Option<usize>,
    /// Keep only the outputs and gradients, freeing every other buffer after
    /// its last reader (its value in the `Evaluation` is an empty tensor).
    pub lean: bool,
}

impl RunOptions {
    /// Every node's value, one thread, nothing streamed: for comparing
    /// backends node by node.
    pub fn full() -> RunOptions {
        RunOptions {
            threads: 1,
            streaming: Streaming::Never,
            tile_rows: None,
            lean: false,
        }
    }

    /// Outputs and gradients only, on every core, streaming what is large.
    pub fn lean() -> RunOptions {
        RunOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            streaming: Streaming::Auto,
            tile_rows: None,
            lean: true,
        }
    }
}

/// Kernel work (elements times reduced extent) below which a node runs on
/// one thread: handing chunks to the kernel threads costs about as much
/// (1 << 16 left CoSENT's 256×256 pair sums on one thread: 0.58 ms there
/// against 0.41–0.48 ms split; the MNRL family did not move).
const MIN_WORK_PER_THREAD: usize = 1 << 15;
/// Threads one kernel call may start, whatever the options say.
const MAX_THREADS: usize = 256;
/// Multiply-adds of a GEMM below which it runs on one thread.
const MIN_GEMM_WORK_PER_THREAD: usize = 1 << 20;

/// The node base pointers, read by the threads of one GEMM.
struct SharedPtrs<'a>(&'a [*mut u8]);
// SAFETY: the pointers are only read; each thread writes disjoint rows of
// the contraction's own buffer.
unsafe impl Sync for SharedPtrs<'_> {}

/// Once per process, unless `LOSSC_MALLOC_DEFAULTS` is set: glibc keeps
/// freed blocks of up to 32 MiB in the heap instead of returning them to the
/// system. A run's gradients leave with the caller and are freed by it; by
/// default glibc gives such blocks back and maps fresh zero pages for the
/// next run's, a page fault per 4 KiB: 40 % of TripletLoss's time at
/// 4096×1024 went to the kernel's page-fault path. Larger blocks are mapped
/// as before (the mmap threshold cannot exceed 32 MiB). One arena: blocks a
/// kernel thread allocates (GEMM's packed panels) and frees stay in the one
/// heap the caller's buffers come from; when the run itself was on a pool
/// worker, per-thread arenas mapped and unmapped the gradients on every run
/// (TripletLoss at 4096×1024 took 1.5× as long, in page faults).
fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("LOSSC_MALLOC_DEFAULTS").is_some() {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only sets glibc's allocator parameters; it is
        // called before this process's kernel threads exist and changes no
        // block already allocated.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    });
}

/// Buffers of earlier runs of a program, reused: a fresh allocation of a
/// large buffer costs a page fault per 4 KiB on first touch, which for
/// O(B·D) losses costs more than the arithmetic.
#[derive(Default)]
pub(super) struct Pool {
    /// Per element type, `(capacity, Vec<T>)` in increasing capacity: a
    /// node's buffer is a binary search away (a run takes one per node).
    bufs: Vec<(TypeId, Vec<Pooled>)>,
    count: usize,
}

/// A pooled `Vec<T>` and its capacity.
type Pooled = (usize, Box<dyn Any + Send>);

/// Buffers smaller than this are not worth keeping (a fresh zeroed
/// allocation of a larger one costs a memset on every run).
const POOL_MIN_ELEMS: usize = 64;
const POOL_MAX_BUFS: usize = 256;

impl Pool {
    /// A zeroed vector of `n` elements, reusing the smallest pooled one that
    /// fits.
    fn take<T: Copy + Default + Send + 'static>(&mut self, n: usize) -> Vec<T> {
        let mut v = self.take_empty(n);
        v.resize(n, T::default());
        v
    }

    /// An empty vector with room for `n` elements, for a buffer its node
    /// fills entirely through its pointer (`Buf::filled`). Nothing is zeroed:
    /// a fresh one is allocated without a memset, which for the gradients a
    /// run hands to its caller (never pooled again) was a third of an
    /// O(B·D) loss's time. Debug builds fill the room with all-ones bytes
    /// (NaN, -1, `true`), so an element a kernel fails to write shows in
    /// the tests' values instead of passing as a zero.
    fn take_empty<T: Copy + Default + Send + 'static>(&mut self, n: usize) -> Vec<T> {
        let pooled = self.of::<T>().and_then(|list| {
            let at = list.partition_point(|(c, _)| *c < n);
            (at < list.len()).then(|| list.remove(at).1)
        });
        let mut v: Vec<T> = match pooled.map(|b| b.downcast::<Vec<T>>()) {
            Some(Ok(mut v)) => {
                self.count -= 1;
                v.clear();
                *v
            }
            _ => Vec::with_capacity(n),
        };
        if cfg!(debug_assertions) {
            // SAFETY: the vector has room for `n` elements; raw bytes
            // written to its spare capacity are not read as `T` until
            // `set_len` (every bit pattern is a valid f32, f64, i64 or u8).
            unsafe { std::ptr::write_bytes(v.as_mut_ptr(), 0xff, n) };
        }
        v
    }

    /// The pooled vectors of `T`, if any were given.
    fn of<T: 'static>(&mut self) -> Option<&mut Vec<Pooled>> {
        let id = TypeId::of::<T>();
        self.bufs
            .iter_mut()
            .find(|(t, _)| *t == id)
            .map(|(_, list)| list)
    }

    fn give<T: Send + 'static>(&mut self, v: Vec<T>) {
        let c = v.capacity();
        if c < POOL_MIN_ELEMS || self.count >= POOL_MAX_BUFS {
            return;
        }
        if self.of::<T>().is_none() {
            self.bufs.push((TypeId::of::<T>(), Vec::new()));
        }
        let list = self.of::<T>().expect("just added");
        let at = list.partition_point(|(k, _)| *k < c);
        list.insert(at, (c, Box::new(v)));
        self.count += 1;
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// A node's value while running: row-major, exactly its shape's elements.
enum Buf<F> {
    F(Vec<F>),
    I(Vec<i64>),
    B(Vec<u8>),
}

impl<F: Real> Buf<F> {
    fn zeroed(pool: &mut Pool, dtype: DType, n: usize) -> Buf<F> {
        match dtype {
            DType::Float => Buf::F(pool.take(n)),
            DType::Int => Buf::I(pool.take(n)),
            DType::Bool => Buf::B(pool.take(n)),
        }
    }

    /// An empty buffer with room for `n` elements, which its node fills
    /// through `ptr` and then declares `filled` (`Pool::take_empty`).
    fn unfilled(pool: &mut Pool, dtype: DType, n: usize) -> Buf<F> {
        match dtype {
            DType::Float => Buf::F(pool.take_empty(n)),
            DType::Int => Buf::I(pool.take_empty(n)),
            DType::Bool => Buf::B(pool.take_empty(n)),
        }
    }

    /// Declares the first `n` elements of an `unfilled` buffer written.
    ///
    /// # Safety
    /// The buffer has room for `n` elements, and every one of them has been
    /// written through `ptr`.
    unsafe fn filled(&mut self, n: usize) {
        match self {
            Buf::F(v) => v.set_len(n),
            Buf::I(v) => v.set_len(n),
            Buf::B(v) => v.set_len(n),
        }
    }

    fn recycle(self, pool: &mut Pool) {
        match self {
            Buf::F(v) => pool.give(v),
            Buf::I(v) => pool.give(v),
            Buf::B(v) => pool.give(v),
        }
    }

    fn ptr(&mut self) -> *mut u8 {
        match self {
            Buf::F(v) => v.as_mut_ptr() as *mut u8,
            Buf::I(v) => v.as_mut_ptr() as *mut u8,
            Buf::B(v) => v.as_mut_ptr(),
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

fn elem_bytes(dtype: DType, p: Precision) -> usize {
    match dtype {
        DType::Float => p.bytes() as usize,
        DType::Int => 8,
        DType::Bool => 1,
    }
}

fn shape_error(msg: impl Into<String>) -> Diagnostic {
    Diagnostic::error(codes::TENSOR_SHAPE, msg)
}

/// Kernels reading at most this many nodes (and dims) get their tables
/// gathered on the stack (`run_blocks`).
const GATHERED: usize = 24;

/// The base pointers of the node buffers, shared read-only by the threads
/// of one kernel call.
#[derive(Clone, Copy)]
struct Ptrs(*const *mut u8);
// SAFETY: kernels write only their own node's rows of the chunk they are
// given; chunks are disjoint, and every other buffer is only read.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

/// One evaluation in progress.
struct Run<'a, F> {
    graph: &'a Graph,
    code: &'a Code,
    bound: &'a Bound,
    opts: RunOptions,
    dim_values: &'a [i64],
    /// Each node's shape at these sizes (inputs: as given).
    shapes: &'a [Vec<usize>],
    elems: &'a [usize],
    bufs: Vec<Option<Buf<F>>>,
    /// Base of each node's buffer (null while it has none): its own buffer,
    /// an input's data, or a tile's virtual base during a pass.
    ptrs: Vec<*mut u8>,
    /// Count buffers of accumulating nodes.
    counts: Vec<Option<Vec<i64>>>,
    /// Elements GEMM added to an accumulating node, for every output element.
    gemm_k: Vec<i64>,
    /// The shape each input was given in (the interpreter reports it).
    given: Vec<Option<Vec<usize>>>,
    pool: Pool,
    /// `Schedule::reduced`.
    reduced: &'a [(usize, usize)],
    /// `Schedule::keep`: the nodes the run returns.
    keep: &'a [bool],
    /// The nodes whose buffers are freed after the current step.
    dying: &'a [usize],
    /// `Schedule::proven` and `Schedule::group_proven`.
    proven: &'a [bool],
    group_proven: &'a [bool],
}

/// Each node's shape and element count at the bound sizes. A size that
/// cannot be evaluated reports the interpreter's first error
/// (`interp::first_error`).
fn node_sizes(graph: &Graph, bound: &Bound) -> Result<(Vec<Vec<usize>>, Vec<usize>), Diagnostic> {
    evaluate_sizes(graph, bound).map_err(|e| crate::interp::first_error(graph, bound, e))
}

fn evaluate_sizes(
    graph: &Graph,
    bound: &Bound,
) -> Result<(Vec<Vec<usize>>, Vec<usize>), Diagnostic> {
    let mut shapes = Vec::with_capacity(graph.nodes.len());
    let mut elems = Vec::with_capacity(graph.nodes.len());
    for node in &graph.nodes {
        let shape = node
            .shape
            .iter()
            .map(|d| match d.eval(&bound.sizes) {
                Some(v) if v >= 0 => Ok(v as usize),
                _ => Err(shape_error(format!(
                    "the size {d} is unknown or negative for these inputs"
                ))),
            })
            .collect::<Result<Vec<usize>, _>>()?;
        let count = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .filter(|n| (*n as u128) * 8 < isize::MAX as u128)
            .ok_or_else(|| shape_error(format!("a node of shape {shape:?} is too large")))?;
        shapes.push(shape);
        elems.push(count);
    }
    Ok((shapes, elems))
}

/// The steps a run at these sizes takes.
pub(super) fn steps(
    graph: &Graph,
    code: &Code,
    bound: &Bound,
    opts: RunOptions,
) -> Result<Vec<Step>, Diagnostic> {
    Ok(Schedule::new(graph, code, bound, opts)?.steps)
}

/// The `TwoSided` products a run with `opts` computes at these sizes, as
/// (left, right) contraction pairs (those of a whole matrix only: the run
/// decides that as it goes).
pub(super) fn two_sided_pairs(
    graph: &Graph,
    code: &Code,
    bound: &Bound,
    opts: RunOptions,
) -> Result<Vec<(NodeId, NodeId)>, Diagnostic> {
    Ok(Schedule::new(graph, code, bound, opts)?
        .two_sided
        .iter()
        .flatten()
        .map(|t| (t.left, t.right))
        .collect())
}

/// What a run does at some sizes and options, worked out once and reused
/// while they repeat (a training loop runs one batch shape over and over):
/// every node's shape, the steps, which nodes are needed and kept, and after
/// which step each buffer is freed. At 32×384 working it out again on every
/// run cost more than some losses' arithmetic.
pub(super) struct Schedule {
    sizes: std::collections::BTreeMap<String, i64>,
    opts: RunOptions,
    precision: Precision,
    shapes: Vec<Vec<usize>>,
    elems: Vec<usize>,
    dim_values: Vec<i64>,
    steps: Vec<Step>,
    /// Nodes a lean run returns (every node in a full run).
    keep: Vec<bool>,
    /// Nodes the run computes: those kept, and everything they read.
    needed: Vec<bool>,
    /// For each step, the nodes freed after it (lean runs).
    frees: Vec<Vec<usize>>,
    /// Per node, and per fusion group, whether its kernel's unchecked reads
    /// stay in range at these sizes (`plan::Proof`; else it is interpreted).
    proven: Vec<bool>,
    group_proven: Vec<bool>,
    /// Per node, the product of its reduction's extents (1 without one),
    /// and the extent of its outermost reduced index (0 without one).
    reduced: Vec<(usize, usize)>,
    /// Per step, the two-sided product it computes for two steps
    /// (`two_sided`; `None` for most).
    two_sided: Vec<Option<TwoSided>>,
}

/// `L[i, k] = sum(j) M[i, j] * X[j, k]` and `R[j, k] = sum(i) M[i, j] *
/// X[i, k]`, read only by `S = L + R`: a gradient through a square matrix
/// read both ways (BatchHard- and BatchAll-style losses, whose distances
/// come from the Gram matrix of one embedding matrix). Where `M` is whole,
/// `S` is `(M + Mᵀ) · X`: the run computes `L` as that one GEMM and `R` as
/// zeros, a third of such a loss's GEMM work saved. Streamed, `M` is only
/// ever a block of rows, so this is a run-time choice, not a rewrite of the
/// graph.
#[derive(Clone, Copy, Debug)]
struct TwoSided {
    left: NodeId,
    right: NodeId,
    matrix: NodeId,
    /// `M` has no reader but the two and is not returned: it is summed with
    /// its transpose in place.
    in_place: bool,
}

impl Schedule {
    fn new(
        graph: &Graph,
        code: &Code,
        bound: &Bound,
        opts: RunOptions,
    ) -> Result<Self, Diagnostic> {
        let n = graph.nodes.len();
        let (shapes, elems) = node_sizes(graph, bound)?;
        let steps = stream::plan(
            graph,
            &code.stream,
            opts.streaming,
            stream::tile_rows(graph, opts.tile_rows),
            stream::CPU_BUDGET,
            &elems,
            code.precision.bytes() as usize,
            &|d| d.eval(&bound.sizes).map_or(0, |v| v.max(0) as usize),
        );
        let keep: Vec<bool> = (0..n)
            .map(|i| {
                let id = NodeId(i as u32);
                !opts.lean
                    || graph.outputs.iter().any(|(_, o)| *o == id)
                    || graph.grads.iter().any(|(_, g)| *g == id)
            })
            .collect();
        let operands: Vec<Vec<NodeId>> = (0..n).map(|i| graph.operands(NodeId(i as u32))).collect();
        // What a lean run needs: its outputs and gradients and everything they
        // read (a node nothing needs is skipped: the whole matrix of a lowered
        // diagonal, `lower.rs`, whose readers read its diagonal instead).
        let mut needed: Vec<bool> = (0..n)
            .map(|i| keep[i] || matches!(graph.nodes[i].kind, NodeKind::Input { .. }))
            .collect();
        for i in (0..n).rev() {
            if needed[i] {
                for op in &operands[i] {
                    needed[op.index()] = true;
                }
            }
        }
        // The last step reading each node, to free it after.
        let mut last_use = vec![0usize; n];
        for (s, step) in steps.iter().enumerate() {
            let nodes: Vec<NodeId> = match step {
                Step::Whole(id) => vec![*id],
                Step::Pass(p) => p.nodes.iter().map(|(id, _)| *id).collect(),
            };
            // An empty slice, reshape or concat copies nothing, so reads
            // nothing. (An empty comprehension's kernel may still read
            // what depends on its outer indices only.)
            let copies_nothing = |id: &NodeId| {
                elems[id.index()] == 0
                    && matches!(
                        graph.node(*id).kind,
                        NodeKind::Slice { .. } | NodeKind::Reshape { .. } | NodeKind::Concat { .. }
                    )
            };
            for id in nodes.into_iter().filter(|id| !copies_nothing(id)) {
                for op in &operands[id.index()] {
                    last_use[op.index()] = s;
                }
            }
        }
        let mut frees = vec![Vec::new(); steps.len()];
        if opts.lean {
            for i in (0..n).filter(|i| !keep[*i]) {
                if let Some(f) = frees.get_mut(last_use[i]) {
                    f.push(i);
                }
            }
        }
        let extent = |d: &crate::ir::Dim| d.eval(&bound.sizes).unwrap_or(0).max(0) as usize;
        let reduced = graph
            .nodes
            .iter()
            .map(|node| match &node.kind {
                NodeKind::Comp(Comp {
                    reduce: Some(r), ..
                }) => (
                    r.over.iter().map(|(_, d)| extent(d).max(1)).product(),
                    r.over.first().map_or(0, |(_, d)| extent(d)),
                ),
                _ => (1, 0),
            })
            .collect();
        let two_sided = two_sided_products(graph, code, &steps, &needed, &keep, &operands);
        Ok(Schedule {
            reduced,
            two_sided,
            sizes: bound.sizes.clone(),
            opts,
            precision: code.precision,
            dim_values: code
                .dims
                .iter()
                .map(|d| d.eval(&bound.sizes).unwrap_or(0))
                .collect(),
            proven: code
                .kernels
                .iter()
                .map(|k| k.as_ref().is_none_or(|k| proofs_hold(k, bound)))
                .collect(),
            group_proven: code
                .groups
                .iter()
                .map(|g| proofs_hold(&g.kernel, bound))
                .collect(),
            shapes,
            elems,
            steps,
            keep,
            needed,
            frees,
        })
    }

    /// Whether this schedule is the one for this code, sizes and options
    /// (the thread count does not change it).
    fn fits(&self, code: &Code, bound: &Bound, opts: RunOptions) -> bool {
        self.precision == code.precision
            && self.sizes == bound.sizes
            && (self.opts.streaming, self.opts.tile_rows, self.opts.lean)
                == (opts.streaming, opts.tile_rows, opts.lean)
    }
}

/// Whether `kernel`'s unchecked reads stay in range at these sizes.
fn proofs_hold(kernel: &CompiledKernel, bound: &Bound) -> bool {
    let sizes = &bound.sizes;
    kernel.proofs.iter().all(|proof| {
        let dim = proof.dim.eval(sizes).unwrap_or(0);
        dim >= proof.bound.eval(sizes).unwrap_or(0).max(0)
    })
}

/// The `TwoSided` products of a schedule, at the step of the first of their
/// two contractions: both whole steps of needed nodes that a lean run does
/// not return, read by nothing but their sum.
fn two_sided_products(
    graph: &Graph,
    code: &Code,
    steps: &[Step],
    needed: &[bool],
    keep: &[bool],
    operands: &[Vec<NodeId>],
) -> Vec<Option<TwoSided>> {
    use crate::ir::contraction::Role::{Outer, K};
    let mut at = vec![None; steps.len()];
    let step_of = |id: NodeId| {
        steps
            .iter()
            .position(|s| matches!(s, Step::Whole(w) if *w == id))
    };
    let readers = |id: NodeId| operands.iter().filter(|ops| ops.contains(&id)).count();
    for node in &graph.nodes {
        let NodeKind::Comp(Comp {
            indices,
            reduce: None,
            body: Expr::Binary(BinOp::Add, l, r),
        }) = &node.kind
        else {
            continue;
        };
        let plain = |e: &Expr| match e {
            Expr::Read { node, at }
                if at.len() == 2 && at.iter().zip(indices).all(|(a, v)| *a == Expr::Index(*v)) =>
            {
                Some(*node)
            }
            _ => None,
        };
        let (Some(a), Some(b)) = (plain(l), plain(r)) else {
            continue;
        };
        let (Some(ca), Some(cb)) = (&code.contractions[a.index()], &code.contractions[b.index()])
        else {
            continue;
        };
        // Which of the two reads `M` by rows (`L`) and which by columns (`R`).
        let (left, right) = if ca.a.roles == [Outer, K] {
            (a, b)
        } else {
            (b, a)
        };
        let (cl, cr) = if left == a { (ca, cb) } else { (cb, ca) };
        let shapes_match = graph.node(cl.a.node).shape.first()
            == graph.node(cl.a.node).shape.get(1)
            && graph.node(left).shape == graph.node(right).shape;
        let fits = !cl.batched
            && !cr.batched
            && cl.a.node == cr.a.node
            && cl.b.node == cr.b.node
            // `M` read as `X` too would change under the GEMM reading it.
            && cl.a.node != cl.b.node
            && cl.a.roles == [Outer, K]
            && cr.a.roles == [K, Outer]
            && cl.b.roles == [K, Outer]
            && cr.b.roles == [K, Outer]
            && cl.k == cr.k
            && cl.empty == 0.0
            && cr.empty == 0.0
            && shapes_match
            && [left, right]
                .iter()
                .all(|n| needed[n.index()] && !keep[n.index()] && readers(*n) == 1);
        if let (true, Some(sl), Some(sr)) = (fits, step_of(left), step_of(right)) {
            let m = cl.a.node;
            at[sl.min(sr)] = Some(TwoSided {
                left,
                right,
                matrix: m,
                in_place: !keep[m.index()] && readers(m) == 2,
            });
        }
    }
    at
}

/// `dst = src + srcᵀ` for row-major `n × n` matrices, `dst` and `src` the
/// same buffer or disjoint ones: each unordered pair `{(i, j), (j, i)}` is
/// read and written once, by tiles `(I, J)` with `I <= J` that keep both
/// the rows and the columns read in cache, the tiles dealt to the kernel
/// threads.
///
/// # Safety
/// `src` and `dst` each hold `n * n` elements of `F`, and either are the
/// same buffer or do not overlap.
unsafe fn symmetrize<F: Real>(src: *const F, dst: *mut F, n: usize, team: Option<&Team>) {
    const TILE: usize = 32;
    let tiles = n.div_ceil(TILE);
    let pairs: Vec<(usize, usize)> = (0..tiles)
        .flat_map(|a| (a..tiles).map(move |b| (a, b)))
        .collect();
    let chunks = match team {
        Some(_) if n * n >= 2 * MIN_WORK_PER_THREAD => pairs.len().min(MAX_THREADS),
        _ => 1,
    };
    let (src, dst) = (src as usize, dst as usize);
    let job = |c: usize| {
        let (src, dst) = (src as *const F, dst as *mut F);
        for &(a, b) in pairs.iter().skip(c).step_by(chunks) {
            for i in a * TILE..((a + 1) * TILE).min(n) {
                let from = if a == b { i } else { b * TILE };
                for j in from..((b + 1) * TILE).min(n) {
                    // SAFETY: i, j < n; this pair is this chunk's alone.
                    unsafe {
                        let v = *src.add(i * n + j) + *src.add(j * n + i);
                        *dst.add(i * n + j) = v;
                        *dst.add(j * n + i) = v;
                    }
                }
            }
        }
    };
    match team {
        Some(team) if chunks > 1 => team.run(chunks, &job),
        _ => (0..chunks).for_each(job),
    }
}

/// A GEMM operand's shape at these sizes, as `gemm::run` reads it: `None`
/// where the node's buffer does not have its node's rank.
fn operand_shape(graph: &Graph, shapes: &[Vec<usize>], n: NodeId) -> Option<Vec<usize>> {
    (graph.node(n).shape.len() == shapes[n.index()].len()).then(|| shapes[n.index()].clone())
}

/// The last schedule a program ran, reused while sizes and options repeat.
pub(super) type LastSchedule = Mutex<Option<std::sync::Arc<Schedule>>>;

/// Runs the program on the calling thread, which hands chunks of its large
/// nodes to the kernel threads (`team`).
pub(super) fn execute<F: Real>(
    graph: &Graph,
    code: &Code,
    bound: &Bound,
    opts: RunOptions,
    pool: &Mutex<Pool>,
    last: &LastSchedule,
) -> Result<Evaluation<F>, Diagnostic> {
    // Before the kernel threads exist (they would take arenas of their own).
    keep_freed_memory();
    let schedule = {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        match &*last {
            Some(s) if s.fits(code, bound, opts) => s.clone(),
            _ => {
                let s = std::sync::Arc::new(Schedule::new(graph, code, bound, opts)?);
                *last = Some(s.clone());
                s
            }
        }
    };
    let schedule: &Schedule = &schedule;
    let n = graph.nodes.len();
    let mut run = Run {
        graph,
        code,
        bound,
        opts,
        dim_values: &schedule.dim_values,
        shapes: &schedule.shapes,
        elems: &schedule.elems,
        bufs: (0..n).map(|_| None).collect(),
        ptrs: vec![std::ptr::null_mut(); n],
        counts: (0..n).map(|_| None).collect(),
        gemm_k: vec![0; n],
        given: vec![None; n],
        pool: std::mem::take(&mut *pool.lock().unwrap_or_else(|e| e.into_inner())),
        reduced: &schedule.reduced,
        keep: &schedule.keep,
        dying: &[],
        proven: &schedule.proven,
        group_proven: &schedule.group_proven,
    };
    let Schedule {
        steps,
        keep,
        needed,
        frees,
        two_sided,
        ..
    } = schedule;
    // Nodes a `TwoSided` product already computed at an earlier step.
    let mut computed = vec![false; n];
    let profile = std::env::var_os("LOSSC_JIT_PROFILE").is_some();
    let mut s = 0;
    while s < steps.len() {
        let started = profile.then(std::time::Instant::now);
        run.dying = &frees[s];
        // A fusion group whose members are the next steps runs as one.
        let group = match &steps[s] {
            Step::Whole(id) => code.group_at[id.index()]
                .map(|g| &code.groups[g])
                .filter(|g| {
                    g.members.iter().enumerate().all(|(k, m)| {
                        needed[m.index()]
                            && matches!(steps.get(s + k), Some(Step::Whole(id)) if id == m)
                    })
                }),
            Step::Pass(_) => None,
        };
        let taken = match (group, &steps[s]) {
            (Some(g), _) => {
                run.group(g)?;
                g.members.len()
            }
            (None, Step::Whole(id)) => {
                if needed[id.index()] && !computed[id.index()] {
                    match two_sided[s] {
                        Some(t) if run.two_sided(t)? => {
                            computed[t.left.index()] = true;
                            computed[t.right.index()] = true;
                        }
                        _ => run.whole(*id)?,
                    }
                }
                1
            }
            (None, Step::Pass(p)) => {
                run.pass(p)?;
                1
            }
        };
        if let Some(t) = started {
            let what = match (group, &steps[s]) {
                (Some(g), _) => format!("group of {:?}", g.members),
                (None, Step::Whole(id)) => format!(
                    "%{} {:?}{}{}",
                    id.index(),
                    run.shapes[id.index()],
                    match &run.graph.node(*id).name {
                        Some(n) => format!(" {n}"),
                        None => String::new(),
                    },
                    if run.code.contractions[id.index()].is_some() {
                        " (contraction)"
                    } else {
                        ""
                    }
                ),
                (None, Step::Pass(p)) => format!(
                    "pass over {:?} (streamed {:?})",
                    p.nodes.iter().map(|(id, _)| id.index()).collect::<Vec<_>>(),
                    p.streamed.iter().map(|id| id.index()).collect::<Vec<_>>()
                ),
            };
            eprintln!(
                "profile: {:>10.3} ms  {what}",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        for &i in frees[s..s + taken].iter().flatten() {
            if let Some(b) = run.bufs[i].take() {
                b.recycle(&mut run.pool);
                run.ptrs[i] = std::ptr::null_mut();
            }
        }
        s += taken;
    }
    // A run that fails drops its buffers instead: errors are rare.
    run.finish(keep).map(|(e, spare)| {
        let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_empty() {
            *p = spare;
        }
        e
    })
}

impl<F: Real> Run<'_, F> {
    fn whole(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        let i = id.index();
        let node = self.graph.node(id);
        match &node.kind {
            NodeKind::Input { .. } => self.input(id),
            NodeKind::Comp(_) => {
                let kernel = self.kernel(id)?;
                if !self.proven[i] {
                    return self.interpret(id);
                }
                // An accumulating contraction run whole by GEMM overwrites
                // every element: its buffer is zeroed only if GEMM declines.
                let whole_gemm = self.accumulating(id) && self.code.contractions[i].is_some();
                if whole_gemm {
                    self.allocate_unfilled(id);
                } else {
                    self.allocate_for(id);
                }
                let done = self.gemm(id, gemm::Part::Whole) || self.ranked(id);
                if whole_gemm {
                    if done {
                        // SAFETY: a whole GEMM wrote every element.
                        unsafe { self.filled(id) };
                    } else {
                        self.zero_unfilled(id);
                    }
                }
                self.complete(id, kernel, done)
            }
            NodeKind::Concat { axis, parts } => self.concat(id, *axis, parts),
            NodeKind::Slice { src, axis, start } => {
                let begin = start.eval(&self.bound.sizes).unwrap_or(0);
                self.slice(id, *src, *axis, begin)
            }
            NodeKind::Reshape { src } => {
                let (i, s) = (id.index(), src.index());
                if self.elems[s] != self.elems[i] {
                    return Err(shape_error(format!(
                        "reshape failed: {} elements into shape {:?}",
                        self.elems[s], self.shapes[i]
                    )));
                }
                if self.take_over(id, *src) {
                    return Ok(());
                }
                let bytes = self.elems[i] * self.bytes(id);
                self.allocate_unfilled(id);
                // SAFETY: both buffers have room for `elems` elements of one
                // dtype, and the copy writes all of them.
                unsafe {
                    // Empty, it reads nothing: its source may be gone.
                    if bytes > 0 {
                        std::ptr::copy_nonoverlapping(self.ptrs[s], self.ptrs[i], bytes);
                    }
                    self.filled(id);
                }
                Ok(())
            }
        }
    }

    /// Node `id`, whose elements are exactly `src`'s in order (a reshape, a
    /// slice or concat that is all of one value), without a copy where that
    /// is safe: an input read in place is read in place by `id` too (kernels
    /// never write through another node's pointer) unless `id` is returned,
    /// and a buffer whose last reader is `id` changes hands. `false`: copy.
    fn take_over(&mut self, id: NodeId, src: NodeId) -> bool {
        let (i, s) = (id.index(), src.index());
        if self.bufs[s].is_none() && !self.ptrs[s].is_null() && !self.keep[i] {
            self.ptrs[i] = self.ptrs[s];
            return true;
        }
        if self.dying.contains(&s) {
            if let Some(buf) = self.bufs[s].take() {
                self.ptrs[i] = self.ptrs[s];
                self.bufs[i] = Some(buf);
                return true;
            }
        }
        false
    }

    /// A comprehension's buffer before it runs: zeroed when it accumulates
    /// (GEMM adds into it, the kernel merges into it), else unfilled.
    fn allocate_for(&mut self, id: NodeId) {
        if self.accumulating(id) {
            self.allocate(id);
        } else {
            self.allocate_unfilled(id);
        }
    }

    /// A comprehension after its GEMM ran (`done`) or declined: else its
    /// kernel computes it now.
    fn complete(
        &mut self,
        id: NodeId,
        kernel: &CompiledKernel,
        done: bool,
    ) -> Result<(), Diagnostic> {
        let i = id.index();
        if !done {
            if self.accumulating(id) {
                self.counts[i] = Some(self.pool.take(self.elems[i]));
            }
            let rows = self.shapes[i].first().copied().unwrap_or(1);
            self.call(id, kernel, (0, rows as i64), (0, i64::MAX))?;
        }
        if self.accumulating(id) {
            if !done {
                self.finalize(id);
            }
        } else {
            // SAFETY: the kernel (or GEMM) wrote every element.
            unsafe { self.filled(id) };
        }
        if let Some(c) = self.counts[i].take() {
            self.pool.give(c);
        }
        Ok(())
    }

    /// Both contractions of `t` at once (`TwoSided`): `left` as the one GEMM
    /// `(M + Mᵀ) · X`, `right` as zeros. `false` (nothing done) where the
    /// matrix is not whole, a kernel's assumed bounds fail, or the GEMM
    /// declines: the two then run as they are.
    fn two_sided(&mut self, t: TwoSided) -> Result<bool, Diagnostic> {
        let (l, r, m) = (t.left.index(), t.right.index(), t.matrix.index());
        let n = self.shapes[m].first().copied().unwrap_or(0);
        let (graph, shapes) = (self.graph, self.shapes);
        let operand_shape = |n: NodeId| operand_shape(graph, shapes, n);
        let accepted = self.code.contractions[l]
            .as_ref()
            .is_some_and(|con| gemm::accepts(con, &self.bound.sizes, &shapes[l], &operand_shape));
        // Decided before `M` may change in place: the GEMM will run.
        if !accepted
            || self.ptrs[m].is_null()
            || self.shapes[m] != [n, n]
            || self.elems[m] != n * n
            || !self.proven[l]
            || !self.proven[r]
        {
            return Ok(false);
        }
        let team = Team::get(self.opts.threads.clamp(1, MAX_THREADS));
        let mut sym: Vec<F> = Vec::new();
        let target = if t.in_place && self.bufs[m].is_some() {
            // `M` has no other reader: it becomes `M + Mᵀ` itself.
            self.ptrs[m] as *mut F
        } else {
            sym = self.pool.take_empty(n * n);
            sym.as_mut_ptr()
        };
        // SAFETY: `M` is a whole float buffer of `n × n` elements (its node's
        // shape at these sizes), row-major, in the run's precision `F`;
        // `sym` has room for as many, and is written whole before `set_len`.
        unsafe {
            symmetrize(self.ptrs[m] as *const F, target, n, team);
            if sym.capacity() >= n * n {
                sym.set_len(n * n);
            }
        }
        let saved = self.ptrs[m];
        self.ptrs[m] = target as *mut u8;
        self.allocate_for(t.left);
        let done = self.gemm(t.left, gemm::Part::Whole);
        // `accepts` held, so the GEMM ran; had it declined, the kernel would
        // compute the same product from the summed matrix.
        let kernel = self.kernel(t.left)?;
        let result = self.complete(t.left, kernel, done);
        self.ptrs[m] = saved;
        if sym.capacity() > 0 {
            self.pool.give(sym);
        }
        result?;
        self.allocate(t.right);
        Ok(true)
    }

    /// A `Ranked` node by sorting (`ranked::evaluate`), where its vectors
    /// are whole and hold numbers. `false`: nothing written, its kernel runs.
    fn ranked(&mut self, id: NodeId) -> bool {
        let Some(r) = self.code.ranked[id.index()] else {
            return false;
        };
        let (Some(kx), Some(ky), Some(g)) = (
            self.float_vector(r.key_x),
            self.float_vector(r.key_y),
            self.float_vector(r.values),
        ) else {
            return false;
        };
        let i = id.index();
        if kx.len() != self.elems[i] || ky.len() != g.len() || self.ptrs[i].is_null() {
            return false;
        }
        // SAFETY: the node's own buffer, `elems` floats in precision `F`,
        // distinct from its inputs' buffers.
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptrs[i] as *mut F, self.elems[i]) };
        ranked::evaluate(kx, ky, g, r.cmp, out)
    }

    /// The elements of float node `v`, computed whole (`None` if not).
    fn float_vector(&self, v: NodeId) -> Option<&[F]> {
        let p = self.ptrs[v.index()];
        // SAFETY: a non-null pointer of a computed float node holds its
        // `elems` elements in the run's precision `F`.
        (!p.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(p as *const F, self.elems[v.index()]) })
    }

    /// A fusion group's members at once (each whole, when the group's
    /// assumed bounds fail).
    fn group(&mut self, g: &Group) -> Result<(), Diagnostic> {
        let proven = self.code.group_at[g.members[0].index()].is_some_and(|k| self.group_proven[k]);
        if !proven {
            return g.members.iter().try_for_each(|id| self.whole(*id));
        }
        for id in &g.members {
            self.allocate_unfilled(*id);
        }
        if let Some((row, col)) = g.pair {
            self.call_pair(&g.kernel, row, col)?;
        } else {
            let first = g.members[0];
            let rows = self.shapes[first.index()].first().copied().unwrap_or(1);
            self.call(first, &g.kernel, (0, rows as i64), (0, i64::MAX))?;
        }
        for id in &g.members {
            // SAFETY: the group's kernel writes every element of every
            // member (a pair's column sum: `call_pair`).
            unsafe { self.filled(*id) };
        }
        Ok(())
    }

    fn kernel(&self, id: NodeId) -> Result<&'static CompiledKernel, Diagnostic> {
        let k = self.code.kernels[id.index()].as_ref().ok_or_else(|| {
            shape_error(format!(
                "internal error: %{} has no compiled kernel",
                id.index()
            ))
        })?;
        // SAFETY: the kernel lives as long as `self.code`, which outlives the
        // run; the 'static only spares threading a lifetime through `Run`.
        Ok(unsafe { &*(k as *const CompiledKernel) })
    }

    fn bytes(&self, id: NodeId) -> usize {
        elem_bytes(self.graph.node(id).dtype, self.code.precision)
    }

    fn accumulating(&self, id: NodeId) -> bool {
        self.code.stream.ranged_red[id.index()].is_some()
    }

    fn allocate(&mut self, id: NodeId) {
        let i = id.index();
        let mut buf = Buf::zeroed(&mut self.pool, self.graph.node(id).dtype, self.elems[i]);
        self.ptrs[i] = buf.ptr();
        self.bufs[i] = Some(buf);
    }

    /// `allocate` for a node that writes every element of its buffer
    /// through its pointer, and then declares it `filled`.
    fn allocate_unfilled(&mut self, id: NodeId) {
        let i = id.index();
        let mut buf = Buf::unfilled(&mut self.pool, self.graph.node(id).dtype, self.elems[i]);
        self.ptrs[i] = buf.ptr();
        self.bufs[i] = Some(buf);
    }

    /// Fills node `id`'s `allocate_unfilled` buffer with zeros, as
    /// `allocate` would have (the buffer and its pointer stay).
    fn zero_unfilled(&mut self, id: NodeId) {
        let n = self.elems[id.index()];
        match self.bufs[id.index()].as_mut() {
            Some(Buf::F(v)) => v.resize(n, F::zero()),
            Some(Buf::I(v)) => v.resize(n, 0),
            Some(Buf::B(v)) => v.resize(n, 0),
            None => {}
        }
    }

    /// Declares node `id`'s `allocate_unfilled` buffer written.
    ///
    /// # Safety
    /// Every element of the buffer has been written through `ptrs[id]`.
    unsafe fn filled(&mut self, id: NodeId) {
        let n = self.elems[id.index()];
        if let Some(b) = self.bufs[id.index()].as_mut() {
            b.filled(n);
        }
    }

    /// An input: its data used in place when it is already in the run's
    /// precision and the run is lean, else converted into a buffer.
    fn input(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        let i = id.index();
        let b = self
            .bound
            .input(id)
            .ok_or_else(|| Diagnostic::error(codes::MISSING_TENSOR, "an input was not bound"))?;
        if b.tensor.len() != self.elems[i] {
            return Err(shape_error(format!(
                "input `{}` does not match its shape",
                b.name
            )));
        }
        let dtype = self.graph.node(id).dtype;
        let in_place = self.opts.lean
            && match (&b.tensor.data, self.code.precision) {
                (TensorData::F32(_), Precision::F32) | (TensorData::F64(_), Precision::F64) => true,
                (TensorData::I64(_), _) => dtype == DType::Int,
                _ => false,
            };
        if in_place {
            // Kernels never write to another node's buffer: the pointer is
            // only read through.
            self.ptrs[i] = match &b.tensor.data {
                TensorData::F32(v) => v.as_ptr() as *mut u8,
                TensorData::F64(v) => v.as_ptr() as *mut u8,
                TensorData::I64(v) => v.as_ptr() as *mut u8,
                TensorData::Bool(v) => v.as_ptr() as *mut u8,
            };
            return Ok(());
        }
        let mut buf = match (&b.tensor.data, dtype) {
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
            (TensorData::Bool(v), DType::Bool) => Buf::B(v.iter().map(|b| u8::from(*b)).collect()),
            _ => {
                return Err(Diagnostic::error(
                    codes::TENSOR_DTYPE,
                    format!("input `{}` has the wrong dtype", b.name),
                ))
            }
        };
        self.ptrs[i] = buf.ptr();
        self.bufs[i] = Some(buf);
        self.given[i] = Some(b.tensor.shape.clone());
        Ok(())
    }

    /// A node whose kernel may not run at these sizes (a proof fails), on
    /// the interpreter: exactly its values, or exactly its error.
    fn interpret(&mut self, id: NodeId) -> Result<(), Diagnostic> {
        let placeholder = || Tensor::F(ArrayD::from_elem(IxDyn(&[0]), F::zero()));
        let mut values: Vec<Tensor<F>> = (0..id.index()).map(|_| placeholder()).collect();
        for op in self.graph.operands(id) {
            let (i, n, shape) = (op.index(), self.elems[op.index()], &self.shapes[op.index()]);
            let ptr = self.ptrs[i];
            if ptr.is_null() {
                return Err(shape_error(format!("internal error: %{i} has no value")));
            }
            let s = IxDyn(shape);
            // SAFETY: a node's base holds its `elems` elements of its dtype in
            // the run's precision (passes, the only holders of partial tiles,
            // run their members whole before calling this).
            let v = unsafe {
                match self.graph.node(op).dtype {
                    DType::Float => ArrayD::from_shape_vec(
                        s,
                        std::slice::from_raw_parts(ptr as *const F, n).to_vec(),
                    )
                    .map(Tensor::F),
                    DType::Int => ArrayD::from_shape_vec(
                        s,
                        std::slice::from_raw_parts(ptr as *const i64, n).to_vec(),
                    )
                    .map(Tensor::I),
                    DType::Bool => ArrayD::from_shape_vec(
                        s,
                        std::slice::from_raw_parts(ptr as *const u8, n)
                            .iter()
                            .map(|b| *b != 0)
                            .collect(),
                    )
                    .map(Tensor::B),
                }
            };
            values[i] = v.map_err(|e| shape_error(format!("internal shape error: {e}")))?;
        }
        let value = crate::interp::comprehension(self.graph, self.bound, &values, id)?;
        self.allocate_unfilled(id);
        match (self.bufs[id.index()].as_mut(), value) {
            (Some(Buf::F(b)), Tensor::F(v)) => b.extend(v),
            (Some(Buf::I(b)), Tensor::I(v)) => b.extend(v),
            (Some(Buf::B(b)), Tensor::B(v)) => b.extend(v.into_iter().map(u8::from)),
            _ => {
                return Err(shape_error(
                    "internal error: the interpreter's dtype differs",
                ))
            }
        }
        Ok(())
    }

    /// The contraction through GEMM when the node is one (`false`: run the
    /// kernel). A whole (unbatched) contraction, a block of its rows, or a slice of
    /// its terms (added to every row) runs as blocks of output rows (or of
    /// columns, when there are more columns than rows) on the kernel threads
    /// when the work pays for it.
    fn gemm(&mut self, id: NodeId, part: gemm::Part) -> bool {
        let Some(con) = &self.code.contractions[id.index()] else {
            return false;
        };
        let (graph, shapes) = (self.graph, self.shapes);
        let operand_shape = |n: NodeId| operand_shape(graph, shapes, n);
        let shape = &self.shapes[id.index()];
        let rows = match (part, con.batched, shape.as_slice()) {
            (gemm::Part::Whole | gemm::Part::K(..), false, [m, _]) => Some((0, *m)),
            (gemm::Part::Rows(lo, hi), false, _) => Some((lo, hi)),
            _ => None,
        };
        let k = match part {
            gemm::Part::K(lo, hi) => hi.saturating_sub(lo),
            _ => con.k.eval(&self.bound.sizes).unwrap_or(0).max(0) as usize,
        };
        let n = shape.last().copied().unwrap_or(0);
        // A block of output columns packs all of A's rows and its own
        // columns of B; a block of rows, all of B: blocks split the longer
        // side, so each thread packs the smaller operand whole. A part that
        // adds its terms into every row splits rows.
        let by_cols = match (part, rows) {
            (gemm::Part::Whole | gemm::Part::Rows(..), Some((lo, hi))) => n > hi - lo,
            _ => false,
        };
        let chunks = rows.map_or(1, |(lo, hi)| {
            let m = hi.saturating_sub(lo);
            (m.saturating_mul(n).saturating_mul(k) / MIN_GEMM_WORK_PER_THREAD)
                .clamp(1, self.opts.threads.clamp(1, MAX_THREADS))
                .min(if by_cols { n } else { m }.max(1))
        });
        let team = if chunks > 1 {
            Team::get(self.opts.threads.clamp(1, MAX_THREADS))
        } else {
            None
        };
        let ptrs = SharedPtrs(&self.ptrs);
        let c = self.ptrs[id.index()] as usize;
        let (precision, sizes) = (self.code.precision, &self.bound.sizes);
        // SAFETY: every node the contraction reads has its buffer (or tile's
        // virtual base) at `ptrs`, row-major in its node shape at these sizes,
        // floats of `code.precision`, which is `F`'s; this node's buffer
        // holds its shape's elements (or is a tile, when `part` is rows);
        // blocks of rows write disjoint rows of it.
        let run = |part: gemm::Part| unsafe {
            let ptrs = &ptrs;
            gemm::run(
                con,
                precision,
                sizes,
                shape,
                &operand_shape,
                ptrs.0,
                c as *mut u8,
                part,
            )
        };
        match (team, rows) {
            (Some(team), Some((lo, hi))) => {
                let per = if by_cols { n } else { hi - lo }.div_ceil(chunks);
                let done: Vec<AtomicBool> = (0..chunks).map(|_| AtomicBool::new(false)).collect();
                team.run(chunks, &|b| {
                    let from = (b * per).min(if by_cols { n } else { hi - lo });
                    let ran = run(match part {
                        _ if by_cols => gemm::Part::Block {
                            rows: (lo, hi),
                            cols: (from, (from + per).min(n)),
                        },
                        gemm::Part::K(klo, khi) => gemm::Part::RowsOfK {
                            rows: (lo + from, (lo + from + per).min(hi)),
                            terms: (klo, khi),
                        },
                        _ => gemm::Part::Rows(lo + from, (lo + from + per).min(hi)),
                    });
                    done[b].store(ran, Ordering::Relaxed);
                });
                // Every block declines alike (the operands' shapes decide);
                // if not, the kernel recomputes every row.
                done.iter().all(|d| d.load(Ordering::Relaxed))
            }
            _ => run(part),
        }
    }

    /// Runs `kernel` on output rows `rows` (and, accumulating, reduced
    /// elements `red`), split into one chunk of rows per thread when the
    /// work pays for it.
    fn call(
        &mut self,
        id: NodeId,
        kernel: &CompiledKernel,
        rows: (i64, i64),
        red: (i64, i64),
    ) -> Result<(), Diagnostic> {
        let i = id.index();
        let counts = self.counts[i]
            .as_mut()
            .map_or(std::ptr::null_mut(), |c| c.as_mut_ptr()) as i64;
        let n_rows = (rows.1 - rows.0).max(0) as usize;
        let shape = &self.graph.node(id).shape;
        let all_rows = self.shapes[i].first().copied().unwrap_or(1).max(1);
        let (reduced, extent) = self.reduced[i];
        let work = (self.elems[i] / all_rows * n_rows).saturating_mul(reduced);
        if shape.is_empty() && self.code.split[i] && red == (0, i64::MAX) {
            let chunks = (work / MIN_WORK_PER_THREAD)
                .clamp(1, self.opts.threads.clamp(1, MAX_THREADS))
                .min(extent);
            if chunks > 1 {
                return self.call_split(id, kernel, extent, chunks);
            }
        }
        let chunks = if shape.is_empty() {
            1
        } else {
            (work / MIN_WORK_PER_THREAD)
                .clamp(1, self.opts.threads.clamp(1, MAX_THREADS))
                .min(n_rows.max(1))
        };
        let per = n_rows.div_ceil(chunks).max(1) as i64;
        let ctls: Vec<[i64; 7]> = (0..chunks as i64)
            .map(|c| {
                let lo = rows.0 + c * per;
                let hi = if chunks == 1 {
                    rows.1
                } else {
                    (lo + per).min(rows.1)
                };
                [lo, hi, red.0, red.1, counts, 0, 0]
            })
            .collect();
        self.run_blocks(kernel, None, &ctls)
    }

    /// A reduction to a scalar split by its outermost reduced index into
    /// `chunks` blocks on the pool, each block's value in its own slot,
    /// combined in order: sums added, extremes by the scalar rule (the first
    /// NaN wins), and a logsumexp as the interpreter's two passes — the
    /// blocks' maxima, then their sums of `exp(x - m)` for the largest.
    fn call_split(
        &mut self,
        id: NodeId,
        kernel: &CompiledKernel,
        extent: usize,
        chunks: usize,
    ) -> Result<(), Diagnostic> {
        let i = id.index();
        let Some(op) = (match &self.graph.node(id).kind {
            NodeKind::Comp(c) => c.reduce.as_ref().map(|r| r.op),
            _ => None,
        }) else {
            return Err(shape_error("internal error: a split node is no reduction"));
        };
        let per = extent.div_ceil(chunks) as i64;
        let blocks = |mode: i64, m: f64| -> Result<Vec<F>, Diagnostic> {
            let mut slots = vec![F::zero(); chunks];
            let base = slots.as_mut_ptr() as usize;
            // Each block's slot is this node's element.
            let bases: Vec<usize> = (0..chunks)
                .map(|c| base + c * std::mem::size_of::<F>())
                .collect();
            let ctls: Vec<[i64; 7]> = (0..chunks as i64)
                .map(|c| {
                    [
                        0,
                        i64::MAX,
                        c * per,
                        c * per + per,
                        0,
                        mode,
                        m.to_bits() as i64,
                    ]
                })
                .collect();
            self.run_blocks(kernel, Some((i, &bases)), &ctls)?;
            Ok(slots)
        };
        let better = |x: F, best: F, max: bool| {
            x.is_nan() && !best.is_nan() || if max { x > best } else { x < best }
        };
        let value = match op {
            RedOp::Sum => blocks(0, 0.0)?.into_iter().fold(F::zero(), |a, x| a + x),
            RedOp::Max | RedOp::Min => {
                let parts = blocks(0, 0.0)?;
                let max = op == RedOp::Max;
                parts[1..].iter().fold(
                    parts[0],
                    |best, x| if better(*x, best, max) { *x } else { best },
                )
            }
            RedOp::LogSumExp => {
                let m = blocks(1, 0.0)?.into_iter().fold(F::neg_infinity(), F::max);
                if m.is_infinite() {
                    m
                } else {
                    let m64 = m.to_f64().unwrap_or(f64::NAN);
                    // A block where nothing passed gives the empty value.
                    let s = blocks(2, m64)?
                        .into_iter()
                        .map(|s| if s == F::neg_infinity() { F::zero() } else { s })
                        .fold(F::zero(), |a, x| a + x);
                    m + s.ln()
                }
            }
            _ => return Err(shape_error("internal error: an unsplittable reduction")),
        };
        // SAFETY: the node's own buffer holds its one element.
        unsafe { *(self.ptrs[i] as *mut F) = value };
        Ok(())
    }

    /// `kernel` once per block on the pool: block `c` with control `ctls[c]`
    /// and the kernel's tables gathered from the run's pointers and dim
    /// values, or with `own = (node, bases)` a copy whose entry for `node` is
    /// `bases[c]` (the block's own slot or buffer); the first failing
    /// block's error, in block order (the interpreter's first).
    fn run_blocks(
        &self,
        kernel: &CompiledKernel,
        own: Option<(usize, &[usize])>,
        ctls: &[[i64; 7]],
    ) -> Result<(), Diagnostic> {
        let slots = &kernel.slots;
        // Gathered on the stack unless the kernel reads many nodes or dims.
        let (mut table_at, mut dims_at) = ([0usize; GATHERED], [0i64; GATHERED]);
        let (table_heap, dims_heap): (Vec<usize>, Vec<i64>);
        let table: &[usize] = if slots.bufs.len() <= GATHERED {
            for (t, n) in table_at.iter_mut().zip(&slots.bufs) {
                *t = self.ptrs[n.index()] as usize;
            }
            &table_at[..slots.bufs.len()]
        } else {
            table_heap = slots
                .bufs
                .iter()
                .map(|n| self.ptrs[n.index()] as usize)
                .collect();
            &table_heap
        };
        let dims: &[i64] = if slots.dims.len() <= GATHERED {
            for (v, d) in dims_at.iter_mut().zip(&slots.dims) {
                *v = self.dim_values[*d];
            }
            &dims_at[..slots.dims.len()]
        } else {
            dims_heap = slots.dims.iter().map(|d| self.dim_values[*d]).collect();
            &dims_heap
        };
        let tables: Vec<Vec<usize>> = own
            .map(|(node, bases)| {
                bases
                    .iter()
                    .map(|b| {
                        let mut t = table.to_vec();
                        for (k, n) in slots.bufs.iter().enumerate() {
                            if n.index() == node {
                                t[k] = *b;
                            }
                        }
                        t
                    })
                    .collect()
            })
            .unwrap_or_default();
        let shared = Ptrs(table.as_ptr() as *const *mut u8);
        let (f, dims) = (kernel.f, dims.as_ptr() as usize);
        let run_block = |c: usize| -> (i64, [i64; 2]) {
            let whole = shared;
            let table = match tables.get(c) {
                Some(t) => t.as_ptr() as *const *mut u8,
                None => whole.0,
            };
            let mut err = [0i64; 2];
            // SAFETY: the table holds the base of every node the kernel reads
            // (each exactly its shape's elements at these sizes, or a tile
            // covering the rows it is given) and of its own output, in the
            // kernel's order; `dims` its dims' values; block `c` writes only
            // the rows `ctls[c]` gives it (and their counts), or its own slot
            // or buffer, which no other block writes.
            let status = unsafe {
                f(
                    table,
                    dims as *const i64,
                    err.as_mut_ptr(),
                    ctls[c].as_ptr(),
                )
            };
            (status, err)
        };
        let n = ctls.len();
        let threads = self.opts.threads.clamp(1, MAX_THREADS);
        let results: Vec<(i64, [i64; 2])> = match (n > 1).then(|| Team::get(threads)).flatten() {
            Some(team) => {
                let slots: Vec<OnceLock<(i64, [i64; 2])>> =
                    (0..n).map(|_| OnceLock::new()).collect();
                team.run(n, &|c| {
                    let _ = slots[c].set(run_block(c));
                });
                slots.into_iter().filter_map(|s| s.into_inner()).collect()
            }
            None => (0..n).map(run_block).collect(),
        };
        match results.into_iter().find(|(s, _)| *s != 0) {
            None => Ok(()),
            Some((status, err)) => Err(kernel_error(self.graph, kernel, &self.shapes, status, err)),
        }
    }

    /// A row/column pair's kernel (`Group`): blocks of the row sum's rows on
    /// the pool, each adding its column sums into a zeroed buffer of its
    /// own, the buffers then added in block order into the column sum.
    fn call_pair(
        &mut self,
        kernel: &CompiledKernel,
        row: NodeId,
        col: NodeId,
    ) -> Result<(), Diagnostic> {
        let rows = self.shapes[row.index()].first().copied().unwrap_or(0);
        let cols = self.elems[col.index()];
        let threads = self.opts.threads.clamp(1, MAX_THREADS);
        let chunks = (rows.saturating_mul(cols) / MIN_WORK_PER_THREAD)
            .clamp(1, threads)
            .min(rows.max(1));
        let per = rows.div_ceil(chunks).max(1) as i64;
        let mut parts: Vec<Vec<F>> = (0..chunks).map(|_| self.pool.take(cols)).collect();
        let bases: Vec<usize> = parts.iter_mut().map(|p| p.as_mut_ptr() as usize).collect();
        let ctls: Vec<[i64; 7]> = (0..chunks as i64)
            .map(|c| [c * per, c * per + per, 0, i64::MAX, 0, 0, 0])
            .collect();
        self.run_blocks(kernel, Some((col.index(), &bases)), &ctls)?;
        // SAFETY: the column sum's buffer has room for its `cols` elements,
        // zeroed (all-zero bits are 0.0) before they are read as floats.
        let out = unsafe {
            let out = self.ptrs[col.index()] as *mut F;
            std::ptr::write_bytes(out, 0, cols);
            std::slice::from_raw_parts_mut(out, cols)
        };
        for p in parts {
            out.iter_mut().zip(&p).for_each(|(o, x)| *o = *o + *x);
            self.pool.give(p);
        }
        Ok(())
    }

    /// An accumulating node's sums and counts into the reduction's values:
    /// the mean, and the empty value where nothing passed.
    fn finalize(&mut self, id: NodeId) {
        self.finalize_range(id, 0, usize::MAX);
    }

    /// `finalize` for elements `from .. to` only.
    fn finalize_range(&mut self, id: NodeId, from: usize, to: usize) {
        let i = id.index();
        let NodeKind::Comp(c) = &self.graph.node(id).kind else {
            return;
        };
        let Some(r) = &c.reduce else { return };
        let (Some(buf), Some(counts)) = (self.bufs[i].as_mut(), self.counts[i].as_ref()) else {
            return;
        };
        let extra = self.gemm_k[i];
        match buf {
            Buf::F(v) => {
                let empty = F::from_f64(r.empty).unwrap_or_else(F::nan);
                let to = to.min(v.len());
                for (x, c) in v[from..to].iter_mut().zip(&counts[from..to]) {
                    let n = c + extra;
                    *x = match (n, r.op) {
                        (0, _) => empty,
                        (_, RedOp::Mean) => *x / F::from_i64(n).unwrap_or_else(F::nan),
                        _ => *x,
                    };
                }
            }
            Buf::I(v) => {
                let to = to.min(v.len());
                for (x, c) in v[from..to].iter_mut().zip(&counts[from..to]) {
                    if c + extra == 0 {
                        *x = r.empty as i64;
                    }
                }
            }
            Buf::B(_) => {}
        }
    }

    /// A pass: its members block by block (module doc).
    fn pass(&mut self, p: &Pass) -> Result<(), Diagnostic> {
        for (id, _) in &p.nodes {
            if !self.proven[id.index()] {
                // Unstreamed, each member whole (`whole` interprets this one).
                return p.nodes.iter().try_for_each(|(id, _)| self.whole(*id));
            }
        }
        // Tiles for the streamed nodes; whole buffers for the others.
        let mut tiles: Vec<(NodeId, Buf<F>, usize)> = Vec::new();
        for &id in &p.streamed {
            let row = self.elems[id.index()] / p.rows;
            let buf = Buf::zeroed(&mut self.pool, self.graph.node(id).dtype, p.tile_rows * row);
            tiles.push((id, buf, row));
        }
        let unfilled = |run: &Self, id: NodeId, mode: Mode| {
            mode == Mode::RowLocal && !run.accumulating(id) && !p.streamed.contains(&id)
        };
        for &(id, mode) in &p.nodes {
            if p.streamed.contains(&id) {
                continue;
            }
            if unfilled(self, id, mode) {
                // Its blocks write every row.
                self.allocate_unfilled(id);
                continue;
            }
            self.allocate(id);
            if self.accumulating(id) {
                self.counts[id.index()] = Some(self.pool.take(self.elems[id.index()]));
                self.gemm_k[id.index()] = 0;
            }
        }
        let mut lo = 0;
        while lo < p.rows {
            let hi = (lo + p.tile_rows).min(p.rows);
            for (id, tile, row) in &mut tiles {
                let bytes = self.bytes(*id);
                // The virtual base: row `lo` of the node is the tile's first.
                self.ptrs[id.index()] = tile.ptr().wrapping_sub(lo * *row * bytes);
            }
            for &(id, mode) in &p.nodes {
                let kernel = self.kernel(id)?;
                let (lo64, hi64) = (lo as i64, hi as i64);
                match mode {
                    Mode::RowLocal => {
                        if !self.gemm(id, gemm::Part::Rows(lo, hi)) {
                            self.call(id, kernel, (lo64, hi64), (0, i64::MAX))?;
                            if self.accumulating(id) {
                                // Read by later members at these rows: final now.
                                let row = self.elems[id.index()] / p.rows;
                                self.finalize_range(id, lo * row, hi * row);
                            }
                        }
                    }
                    Mode::Accumulate { .. } => {
                        if self.gemm(id, gemm::Part::K(lo, hi)) {
                            self.gemm_k[id.index()] += hi64 - lo64;
                        } else {
                            let rows = self.shapes[id.index()].first().copied().unwrap_or(1);
                            self.call(id, kernel, (0, rows as i64), (lo64, hi64))?;
                        }
                    }
                }
            }
            lo = hi;
        }
        for (id, mode) in &p.nodes {
            if let Mode::Accumulate { .. } = mode {
                self.finalize(*id);
            }
            if unfilled(self, *id, *mode) {
                // SAFETY: the blocks wrote every row of this row-local member.
                unsafe { self.filled(*id) };
            }
            if let Some(c) = self.counts[id.index()].take() {
                self.pool.give(c);
            }
        }
        for (id, tile, _) in tiles {
            self.ptrs[id.index()] = std::ptr::null_mut();
            tile.recycle(&mut self.pool);
        }
        Ok(())
    }

    fn concat(&mut self, id: NodeId, axis: usize, parts: &[NodeId]) -> Result<(), Diagnostic> {
        let i = id.index();
        let shape = self.shapes[i].clone();
        let first = self.shapes[parts[0].index()].clone();
        let mut joined = first.clone();
        joined[axis] = 0;
        for p in parts {
            let s = &self.shapes[p.index()];
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
        // All of one part (MNRL without negatives: `docs` is the positives).
        let mut full = parts.iter().filter(|p| self.elems[p.index()] > 0);
        if let (Some(p), None) = (full.next(), full.next()) {
            if self.elems[p.index()] == self.elems[i] && self.take_over(id, *p) {
                return Ok(());
            }
        }
        let esize = self.bytes(id);
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        self.allocate_unfilled(id);
        let mut at = 0;
        for o in 0..outer {
            for p in parts.iter().filter(|p| self.elems[p.index()] > 0) {
                let rows = self.shapes[p.index()][axis] * inner * esize;
                // SAFETY: part `p` holds `outer * rows` bytes; the output
                // holds the sum over parts, filled in order.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ptrs[p.index()].add(o * rows),
                        self.ptrs[i].add(at),
                        rows,
                    )
                };
                at += rows;
            }
        }
        // SAFETY: the parts filled the output in full (`joined == shape`).
        unsafe { self.filled(id) };
        Ok(())
    }

    fn slice(
        &mut self,
        id: NodeId,
        src: NodeId,
        axis: usize,
        begin: i64,
    ) -> Result<(), Diagnostic> {
        let i = id.index();
        let shape = self.shapes[i].clone();
        let s = self.shapes[src.index()].clone();
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
        // All of it (MNRL without negatives slices all of `docs`' gradient).
        if shape == s && self.take_over(id, src) {
            return Ok(());
        }
        let esize = self.bytes(id);
        let outer: usize = s[..axis].iter().product();
        let inner = s[axis + 1..].iter().product::<usize>() * esize;
        let (row, start, len) = (s[axis] * inner, begin as usize * inner, shape[axis] * inner);
        self.allocate_unfilled(id);
        // An empty slice reads nothing: its source may be gone already
        // (`Schedule::new` does not count it as a reader).
        for o in (0..outer).filter(|_| len > 0) {
            // SAFETY: the source holds `outer * row` bytes and
            // `start + len <= row`; the output holds `outer * len`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.ptrs[src.index()].add(o * row + start),
                    self.ptrs[i].add(o * len),
                    len,
                )
            };
        }
        // SAFETY: `outer` rows of `len` bytes are the output's elements.
        unsafe { self.filled(id) };
        Ok(())
    }

    /// The evaluation: kept buffers as tensors, the rest empty (and back in
    /// the pool, which is returned).
    fn finish(mut self, keep: &[bool]) -> Result<(Evaluation<F>, Pool), Diagnostic> {
        let mut values = Vec::with_capacity(self.bufs.len());
        // One empty tensor cloned for every node not returned: cheaper than
        // building each one's shape and strides.
        let empty = Tensor::F(ArrayD::zeros(IxDyn(&[0])));
        for (i, buf) in std::mem::take(&mut self.bufs).into_iter().enumerate() {
            let t = match buf {
                Some(b) if keep[i] => b
                    .into_tensor(self.given[i].as_ref().unwrap_or(&self.shapes[i]))
                    .map_err(|e| shape_error(format!("internal shape error: {e}")))?,
                Some(b) => {
                    b.recycle(&mut self.pool);
                    empty.clone()
                }
                None => empty.clone(),
            };
            values.push(t);
        }
        let outputs = crate::interp::scalar_outputs(self.graph, &values);
        Ok((Evaluation { outputs, values }, self.pool))
    }
}
