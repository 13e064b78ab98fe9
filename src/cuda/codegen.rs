//! CUDA C for one graph: a pure function from (graph, precision) to source
//! text and the launch plan of every kernel. Runs on any machine; the text is
//! what `lossc cuda` prints and what the snapshot tests pin.
//!
//! * One `extern "C" __global__` kernel per non-input node, named
//!   `lossc_n<id>`, or per sibling group (`Graph::sibling_groups`, the
//!   JIT's rule: consecutive float comprehensions with the same loops, none
//!   reading another; here those that run as grid-stride loops, outside
//!   streaming regions), named `lossc_g<first>`; all with the signature
//!   `(void* const* bufs, const long long* dims, long long* err)`: `bufs[n]`
//!   is node n's device buffer (row-major in its shape; floats as `real`,
//!   ints as `long long`, bools as `unsigned char`), `dims` the dim table
//!   (every symbolic size a kernel needs, evaluated on the host), `err` the
//!   first error seen (site + 1, then two operands).
//! * Elementwise nodes and reductions with an index space are a grid-stride
//!   loop over output elements, the reduction an inner loop nest per element.
//!   A reduction to a scalar is up to `SCALAR_GRID` blocks striding over the
//!   reduced space, each combining its threads' partial states in a
//!   shared-memory tree, and the last block to finish combining the blocks'
//!   states in the same tree (fixed order, so deterministic). A block
//!   reduction also computes each output element of a reduction whose
//!   innermost reduced index walks the contiguous dim of a read (a row of a
//!   score matrix, a norm), one block per element (`Launch::Rows`).
//!   Contractions (`ir::contraction`) are a shared-memory tiled kernel (64×64
//!   output tiles, 4×4 per thread). Layout nodes (concat, slice, reshape)
//!   are copy kernels.
//! * Semantics are the interpreter's: `if` evaluates only the taken branch
//!   (control flow, never a select of both), max/min keep the first extreme
//!   (a NaN beats a number), NaN-propagating maximum/minimum/clamp,
//!   logsumexp in two passes with -inf for an empty or all -inf set,
//!   Euclidean `%` and `//`, an empty filtered set takes the `empty` value.
//! * Streaming (`crate::stream`, the JIT's schedule): a kernel of a member
//!   of a streaming region computes a block of rows, `lo .. lo + len`, read
//!   from two dim-table slots the host sets per block (`block_symbols`).
//!   A *row-local* member computes the output rows of the block; an
//!   *accumulating* member (a `sum`, `mean` or `count` over the row
//!   variable) folds the block's rows and merges the fold into its output
//!   (the first block, `lo == 0`, starts it; a mean or a non-zero empty
//!   value keeps a running fold and count after the output). A whole run is
//!   one block of every row. Streamed nodes exist only as tiles: the host
//!   points their table entry at the tile minus the block's first row, and
//!   every read of them is at the ranged row variable, so indices stay
//!   absolute and land in the tile.
//! * Never out of bounds: a read index is either proven in range
//!   symbolically (a loop variable whose extent fits the read dim; the proof
//!   is re-checked numerically on the host before launching) or checked in
//!   the kernel; a failed check records the site in `err` and reads nothing
//!   (the value is 0), and the host turns `err` into the interpreter's
//!   diagnostic. Kernels never return from a divergent branch, so block
//!   barriers stay uniform.

use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, NodeId, NodeKind, RedOp, UnOp};
use crate::jit::Precision;
use crate::stream::{self, Analysis, Mode};
use std::collections::HashMap;
use std::fmt::Write;

/// Threads per block of grid-stride kernels, and the most a block
/// reduction over rows uses.
pub const BLOCK: u32 = 256;
/// Threads of the one block that reduces to a scalar (the most a block may
/// have): such a reduction runs on one multiprocessor, so it takes them all.
/// Block reductions' shared arrays hold this many partial states.
pub const SCALAR_BLOCK: u32 = 1024;
/// The most blocks a reduction to a scalar uses.
pub const SCALAR_GRID: u32 = 256;
/// Bytes a reduction to a scalar needs after its output element: a ticket
/// counter, four arrays of `SCALAR_GRID` partial-state words, and the
/// running fold and count of an accumulating one.
pub const SCALAR_SCRATCH: usize = 8 + 8 + 4 * 8 * SCALAR_GRID as usize + 16;
/// Offset of the running fold and count in the scratch of a reduction to
/// a scalar.
const SCALAR_TOTALS: usize = 8 + 8 + 4 * 8 * SCALAR_GRID as usize;
/// Side of a contraction kernel's thread block (TILE × TILE threads).
pub const TILE: u32 = 16;
/// Each contraction thread computes MICRO × MICRO outputs: an output tile
/// is (TILE · MICRO)² elements.
pub const MICRO: u32 = 4;

/// How float inputs are stored on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Inputs {
    /// In the precision the kernels compute in.
    #[default]
    Native,
    /// bfloat16 (half the bytes of f32), widened to f32 as they are read;
    /// everything else is f32 (accumulation included).
    Bf16,
}

/// The generated program of one graph at one precision.
#[derive(Clone, Debug)]
pub struct Source {
    /// How its float inputs are stored.
    pub inputs: Inputs,
    pub text: String,
    pub kernels: Vec<Kernel>,
    /// The dim table: slot k of `dims` is `dims[k]` evaluated at the sizes.
    pub dims: Vec<Dim>,
    /// Unchecked reads stay in range when every `dim >= max(bound, 0)`.
    pub proofs: Vec<(Dim, Dim)>,
    /// What a kernel's error code (site + 1) means.
    pub sites: Vec<Site>,
    /// What may stream (`stream::analyse`; a region sharing a member with
    /// an earlier one is dropped, so each kernel has one row range).
    pub stream: Analysis,
}

#[derive(Clone, Debug)]
pub struct Kernel {
    /// The node it computes; a group's first member.
    pub node: NodeId,
    /// Every node it computes, in order: `[node]`, or a group's members
    /// (consecutive nodes the host runs as consecutive steps; it launches
    /// the kernel at the last one's).
    pub members: Vec<NodeId>,
    pub name: String,
    pub launch: Launch,
    /// The streaming region whose row range the kernel runs over, and how.
    pub ranged: Option<(usize, Mode)>,
    /// An accumulating kernel that keeps a running fold and count per
    /// output element: its buffer holds `8 * total` bytes for the output,
    /// then `16 * total` of state.
    pub state: bool,
}

/// The dim-table symbols of region `k`'s block: its first row and its row
/// count. The host binds them per block (a whole run: 0 and every row).
pub fn block_symbols(region: usize) -> (String, String) {
    (format!("lossc.lo{region}"), format!("lossc.len{region}"))
}

/// How the host launches a kernel; sizes are dim-table slots.
#[derive(Clone, Debug, PartialEq)]
pub enum Launch {
    /// `BLOCK` threads per block, enough blocks for `total` elements.
    Grid { total: usize },
    /// A reduction to a scalar: up to `SCALAR_GRID` blocks of
    /// `SCALAR_BLOCK` threads over `len` elements; the last block to finish
    /// combines the blocks' partial states (kept in `SCALAR_SCRATCH` bytes
    /// after the output element, zeroed before the launch).
    Scalar { len: usize },
    /// One block per output element (of `total`), each reducing `len`
    /// elements; the block size is a power of two up to `BLOCK`.
    Rows { total: usize, len: usize },
    /// TILE × TILE threads per block, one block per (TILE·MICRO)² tile of
    /// an `m × n` output, per batch.
    Tiled {
        m: usize,
        n: usize,
        batch: Option<usize>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Site {
    Index { node: NodeId, dim: usize },
    RemByZero,
    DivByZero,
    Mixed(BinOp),
}

/// The runtime type of a scalar (the interpreter's, as in `jit::plan`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ty {
    F,
    I,
    B,
}

fn ty_of(d: DType) -> Ty {
    match d {
        DType::Float => Ty::F,
        DType::Int => Ty::I,
        DType::Bool => Ty::B,
    }
}

fn c_type(t: Ty) -> &'static str {
    match t {
        Ty::F => "real",
        Ty::I => "long long",
        Ty::B => "bool",
    }
}

fn storage_type(d: DType) -> &'static str {
    match d {
        DType::Float => "real",
        DType::Int => "long long",
        DType::Bool => "unsigned char",
    }
}

/// The interpreter's result type of a unary operation.
fn unary_ty(op: UnOp, a: Ty) -> Ty {
    match (op, a) {
        (UnOp::Neg | UnOp::Abs, Ty::I) => Ty::I,
        (UnOp::Not, _) => Ty::B,
        _ => Ty::F,
    }
}

/// The interpreter's result type of a binary operation.
fn binary_ty(op: BinOp, a: Ty, b: Ty) -> Ty {
    match (a, b) {
        (Ty::I, Ty::I) if op.is_comparison() => Ty::B,
        (Ty::I, Ty::I) => Ty::I,
        (Ty::B, Ty::B) => Ty::B,
        (Ty::F, Ty::F) if op.is_comparison() => Ty::B,
        _ => Ty::F,
    }
}

/// A float constant as C source of type `real` (exact: the f64 literal
/// rounds to `real` as the interpreter's `from_f64` does).
fn float_lit(x: f64) -> String {
    if x.is_nan() {
        "LOSSC_NAN".into()
    } else if x == f64::INFINITY {
        "LOSSC_INF".into()
    } else if x == f64::NEG_INFINITY {
        "(-LOSSC_INF)".into()
    } else {
        format!("((real){x:?})")
    }
}

const PRELUDE: &str = r#"// Helpers: each is the interpreter's formula (src/interp/mod.rs).
__device__ __forceinline__ bool lossc_isnan(real x) { return x != x; }
__device__ __forceinline__ real lossc_max(real a, real b) {
    return (lossc_isnan(a) || lossc_isnan(b)) ? LOSSC_NAN : (a >= b ? a : b);
}
__device__ __forceinline__ real lossc_min(real a, real b) {
    return (lossc_isnan(a) || lossc_isnan(b)) ? LOSSC_NAN : (a <= b ? a : b);
}
// log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exact and overflow-free.
__device__ __forceinline__ real lossc_softplus(real x) {
    return lossc_max(x, (real)0) + log1p(exp(-fabs(x)));
}
__device__ __forceinline__ real lossc_log_sigmoid(real x) {
    return lossc_min(x, (real)0) - log1p(exp(-fabs(x)));
}
__device__ __forceinline__ real lossc_sigmoid(real x) {
    if (x >= (real)0) return (real)1 / ((real)1 + exp(-x));
    real e = exp(x);
    return e / ((real)1 + e);
}
__device__ __forceinline__ real lossc_relu(real x) {
    return (lossc_isnan(x) || x > (real)0) ? x : (real)0;
}
// Rust's `to_i64().unwrap_or(0)`: truncation, 0 for NaN and out of range.
__device__ __forceinline__ long long lossc_to_int(real x) {
    double d = (double)x;
    return (d != d || d >= 9223372036854775807.0 || d < -9223372036854775808.0) ? 0LL : (long long)d;
}
// Wrapping integer arithmetic, as the interpreter's wrapping_*.
__device__ __forceinline__ long long lossc_iadd(long long a, long long b) {
    return (long long)((unsigned long long)a + (unsigned long long)b);
}
__device__ __forceinline__ long long lossc_isub(long long a, long long b) {
    return (long long)((unsigned long long)a - (unsigned long long)b);
}
__device__ __forceinline__ long long lossc_imul(long long a, long long b) {
    return (long long)((unsigned long long)a * (unsigned long long)b);
}
// Euclidean remainder and division (b != 0, checked by the caller).
__device__ __forceinline__ long long lossc_rem(long long a, long long b) {
    if (b == -1) return 0;
    long long r = a % b;
    return r < 0 ? (b < 0 ? r - b : r + b) : r;
}
__device__ __forceinline__ long long lossc_div(long long a, long long b) {
    if (b == -1) return lossc_isub(0, a);
    long long q = a / b;
    return (a % b < 0) ? (b > 0 ? q - 1 : q + 1) : q;
}
// The first error wins; later ones are dropped.
__device__ void lossc_fail(long long* err, long long site, long long a, long long b) {
    if (atomicCAS((unsigned long long*)err, 0ULL, (unsigned long long)site) == 0ULL) {
        err[1] = a;
        err[2] = b;
    }
}
"#;

/// Generates the CUDA C program of `graph` (every node but inputs).
pub fn generate(graph: &Graph, p: Precision, inputs: Inputs) -> Result<Source, String> {
    if inputs == Inputs::Bf16 && p != Precision::F32 {
        return Err("bf16 inputs are computed in f32, not f64".into());
    }
    let (analysis, ranged) = schedule(graph);
    let mut g = Gen {
        graph,
        dims: Vec::new(),
        dim_index: HashMap::new(),
        proofs: Vec::new(),
        sites: Vec::new(),
        range: None,
        state: false,
        bf16: inputs == Inputs::Bf16,
    };
    let mut text = String::new();
    let _ = writeln!(
        text,
        "// lossc: CUDA C for `{}` ({} nodes, {}).",
        graph.name,
        graph.nodes.len(),
        p.name()
    );
    match p {
        Precision::F32 => {
            text.push_str("typedef float real;\n");
            text.push_str("#define LOSSC_NAN __int_as_float(0x7fffffff)\n");
            text.push_str("#define LOSSC_INF __int_as_float(0x7f800000)\n");
        }
        Precision::F64 => {
            text.push_str("typedef double real;\n");
            text.push_str("#define LOSSC_NAN __longlong_as_double(0x7ff8000000000000LL)\n");
            text.push_str("#define LOSSC_INF __longlong_as_double(0x7ff0000000000000LL)\n");
        }
    }
    text.push_str(PRELUDE);
    if inputs == Inputs::Bf16 {
        text.push_str(
            "// Float inputs are bfloat16: the high half of a float's bits.\n\
             __device__ __forceinline__ float lossc_bf16(unsigned short h) {\n    \
             return __int_as_float((int)((unsigned int)h << 16));\n}\n",
        );
    }
    let groups = g.groups(&ranged);
    let mut kernels = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let group = groups.iter().find(|m| m.contains(&id));
        if group.is_some_and(|m| m[0] != id) || matches!(node.kind, NodeKind::Input { .. }) {
            continue;
        }
        g.state = false;
        g.range = match (&node.kind, ranged[i]) {
            (NodeKind::Comp(c), Some((k, mode))) => {
                let (lo, len) = block_symbols(k);
                Some(Range {
                    lo: Dim::sym(&lo),
                    len: Dim::sym(&len),
                    over: match mode {
                        Mode::RowLocal => None,
                        Mode::Accumulate { level } => Some(level - c.indices.len()),
                    },
                })
            }
            _ => None,
        };
        let (name, members) = match group {
            Some(members) => (format!("lossc_g{i}"), members.clone()),
            None => (format!("lossc_n{i}"), vec![id]),
        };
        let (body, launch) = match &node.kind {
            _ if members.len() > 1 => g.group(&members)?,
            NodeKind::Input { .. } => continue,
            NodeKind::Comp(c) => g.comp(id, c)?,
            NodeKind::Concat { axis, parts } => g.concat(id, *axis, parts),
            NodeKind::Slice { src, axis, start } => g.slice(id, *src, *axis, start),
            NodeKind::Reshape { src } => g.reshape(id, *src),
        };
        text.push('\n');
        for m in &members {
            let line = crate::ir::print::print_node(graph, *m, graph.node(*m));
            for line in line.trim_end().lines() {
                let _ = writeln!(text, "// {line}");
            }
        }
        let _ = writeln!(
            text,
            "extern \"C\" __global__ void {name}(void* const* __restrict__ bufs, const long long* __restrict__ dims, long long* __restrict__ err) {{"
        );
        text.push_str(&body);
        text.push_str("}\n");
        kernels.push(Kernel {
            node: id,
            members,
            name,
            launch,
            ranged: ranged[i],
            state: g.state,
        });
    }
    Ok(Source {
        inputs,
        text,
        kernels,
        dims: g.dims,
        proofs: g.proofs,
        sites: g.sites,
        stream: analysis,
    })
}

/// The streaming regions kernels are generated for, and each node's region
/// and mode. A node belongs to at most one region: a region with a member
/// (streamable node or reader) already in an earlier one is dropped.
fn schedule(graph: &Graph) -> (Analysis, Vec<Option<(usize, Mode)>>) {
    let full = stream::analyse(graph);
    let mut ranged: Vec<Option<(usize, Mode)>> = vec![None; graph.nodes.len()];
    let mut regions = Vec::new();
    for region in full.regions {
        if region.modes.keys().any(|id| ranged[id.index()].is_some()) {
            continue;
        }
        for (id, mode) in &region.modes {
            ranged[id.index()] = Some((regions.len(), *mode));
        }
        regions.push(region);
    }
    let ranged_red = ranged
        .iter()
        .map(|r| match r {
            Some((_, Mode::Accumulate { level })) => Some(*level),
            _ => None,
        })
        .collect();
    (
        Analysis {
            regions,
            ranged_red,
        },
        ranged,
    )
}

/// State shared by every kernel of a graph: the dim table, proofs, sites;
/// and the row range of the kernel being generated.
struct Gen<'a> {
    graph: &'a Graph,
    dims: Vec<Dim>,
    dim_index: HashMap<Dim, usize>,
    proofs: Vec<(Dim, Dim)>,
    sites: Vec<Site>,
    range: Option<Range>,
    /// The kernel being generated keeps a per-element fold and count.
    state: bool,
    /// Float inputs are bfloat16.
    bf16: bool,
}

/// The rows of a block (module doc): its first row and row count, and
/// which reduced variable runs over them (`None`: the first output index).
#[derive(Clone)]
struct Range {
    lo: Dim,
    len: Dim,
    over: Option<usize>,
}

impl Gen<'_> {
    fn slot(&mut self, d: &Dim) -> usize {
        if let Some(s) = self.dim_index.get(d) {
            return *s;
        }
        self.dims.push(d.clone());
        self.dim_index.insert(d.clone(), self.dims.len() - 1);
        self.dims.len() - 1
    }

    /// C source for a dim's runtime value.
    fn dim(&mut self, d: &Dim) -> String {
        match d.as_lit() {
            Some(n) => format!("{n}LL"),
            None => format!("dims[{}]", self.slot(d)),
        }
    }

    fn site(&mut self, s: Site) -> usize {
        if let Some(i) = self.sites.iter().position(|x| *x == s) {
            return i + 1;
        }
        self.sites.push(s);
        self.sites.len()
    }

    fn prove(&mut self, bound: Dim, dim: &Dim) -> bool {
        if !dim.sub(&bound).is_non_negative() {
            return false;
        }
        let proof = (bound, dim.clone());
        if !self.proofs.contains(&proof) {
            self.proofs.push(proof);
        }
        true
    }

    fn product(dims: &[Dim]) -> Dim {
        dims.iter().fold(Dim::lit(1), |a, d| a.mul(d))
    }

    /// The sibling groups kernels are generated for: float comprehensions
    /// that run as grid-stride loops (no contraction, no block reduction,
    /// not to a scalar), none in a streaming region or reading, directly or
    /// not, a node in one (so a run's steps always take a group's members
    /// one after the other).
    fn groups(&self, ranged: &[Option<(usize, Mode)>]) -> Vec<Vec<NodeId>> {
        const MAX_GROUP: usize = 8;
        let graph = self.graph;
        let mut near_region = vec![false; graph.nodes.len()];
        for i in 0..graph.nodes.len() {
            near_region[i] = ranged[i].is_some()
                || graph
                    .operands(NodeId(i as u32))
                    .iter()
                    .any(|o| near_region[o.index()]);
        }
        graph.sibling_groups(MAX_GROUP, |id| {
            let node = graph.node(id);
            let NodeKind::Comp(c) = &node.kind else {
                return false;
            };
            node.dtype == DType::Float
                && !node.shape.is_empty()
                && !near_region[id.index()]
                && crate::ir::contraction::recognise(graph, c, node.dtype).is_none()
                && c.reduce.as_ref().is_none_or(|r| !self.rows_pay(c, r))
        })
    }

    /// Whether node `n`'s buffer holds bfloat16 (a float input, with bf16
    /// inputs).
    fn is_bf16(&self, n: NodeId) -> bool {
        let node = self.graph.node(n);
        self.bf16 && matches!(node.kind, NodeKind::Input { .. }) && node.dtype == DType::Float
    }

    /// The C type of the elements of node `n`'s buffer.
    fn elem_type(&self, n: NodeId) -> &'static str {
        if self.is_bf16(n) {
            "unsigned short"
        } else {
            storage_type(self.graph.node(n).dtype)
        }
    }

    /// An element `load`ed from node `n`'s buffer as a value of its type.
    fn widen(&self, n: NodeId, load: String) -> String {
        if self.is_bf16(n) {
            format!("lossc_bf16({load})")
        } else {
            load
        }
    }

    /// C source of a ranged kernel's first row, end row and row count.
    fn range_c(&mut self) -> Option<(String, String, String)> {
        let r = self.range.clone()?;
        Some((
            self.dim(&r.lo),
            self.dim(&r.lo.add(&r.len)),
            self.dim(&r.len),
        ))
    }

    /// The kernel computes a block of its output rows.
    fn row_local(&self) -> bool {
        matches!(&self.range, Some(r) if r.over.is_none())
    }

    /// The position in `over` of the reduced variable an accumulating
    /// kernel runs over a block of.
    fn range_over(&self) -> Option<usize> {
        self.range.as_ref().and_then(|r| r.over)
    }

    /// The dim-table slot of the output elements a launch computes, and for
    /// a row-local kernel the C source of the first one's position.
    fn out_total(&mut self, id: NodeId) -> (usize, Option<String>) {
        let shape = self.graph.node(id).shape.clone();
        match self.range.clone() {
            Some(Range {
                lo,
                len,
                over: None,
            }) => {
                let inner = Self::product(&shape[1..]);
                let base = self.dim(&lo.mul(&inner));
                (self.slot(&len.mul(&inner)), Some(base))
            }
            _ => (self.slot(&Self::product(&shape)), None),
        }
    }

    /// Declarations of the output buffer (and `total`, and a row-local
    /// kernel's `base`) every kernel starts with.
    fn out_decl(&mut self, id: NodeId) -> (String, usize) {
        let ty = storage_type(self.graph.node(id).dtype);
        let (slot, base) = self.out_total(id);
        let mut s = format!(
            "    {ty}* __restrict__ out = ({ty}*)bufs[{}];\n    const long long total = dims[{slot}];\n",
            id.0
        );
        if let Some(base) = base {
            let _ = writeln!(s, "    const long long base = {base};");
        }
        (s, slot)
    }

    fn grid_loop_open() -> &'static str {
        "    for (long long flat = (long long)blockIdx.x * blockDim.x + threadIdx.x; flat < total; flat += (long long)gridDim.x * blockDim.x) {\n"
    }

    fn comp(&mut self, id: NodeId, c: &Comp) -> Result<(String, Launch), String> {
        let node = self.graph.node(id);
        if let Some(con) = crate::ir::contraction::recognise(self.graph, c, node.dtype) {
            if let Some(k) = self.tiled(id, &con) {
                return Ok(k);
            }
        }
        let levels = c.levels(&node.shape)[..c.indices.len()].to_vec();
        if let Some(r) = &c.reduce {
            if c.indices.is_empty() {
                let len = self
                    .reduced_extents(r)
                    .iter()
                    .fold(Dim::lit(1), |a, d| a.mul(d));
                let len = self.slot(&len);
                return Ok((self.grid_reduce(id, c, r), Launch::Scalar { len }));
            }
            if self.range_over().is_none() && self.rows_pay(c, r) {
                let (total, _) = self.out_total(id);
                let len = r.over.iter().fold(Dim::lit(1), |a, (_, d)| a.mul(d));
                let len = self.slot(&len);
                let text = self.block_reduce(id, c, r)?;
                return Ok((text, Launch::Rows { total, len }));
            }
        }
        let (mut decl, total) = self.out_decl(id);
        let at = if self.row_local() {
            "flat + base"
        } else {
            "flat"
        };
        if let Some(r) = c.reduce.as_ref().filter(|_| self.range_over().is_some()) {
            if needs_state(r) {
                // The running fold and count of each element (module doc).
                self.state = true;
                let acc = Acc {
                    op: r.op,
                    dtype: node.dtype,
                    body: self.body_ty(&c.body),
                };
                let t = c_type(acc.item_ty());
                let _ = writeln!(decl, "    char* state = (char*)bufs[{}] + 8 * total;", id.0);
                let _ = writeln!(decl, "    {t}* st_v = ({t}*)state;");
                let _ = writeln!(
                    decl,
                    "    long long* st_n = (long long*)(state + 8 * total);"
                );
            }
        }
        let mut e = Emitter::new(self, 2);
        e.output_position(&levels);
        let value = match &c.reduce {
            None => {
                let (v, t) = e.expr(&c.body);
                e.convert(&v, t, ty_of(node.dtype))
            }
            Some(r) => e.reduce_loops(r, &c.body, node.dtype)?,
        };
        e.line(&format!("out[{at}] = {};", store(&value, node.dtype)));
        let mut s = decl;
        s.push_str(Self::grid_loop_open());
        if !levels.is_empty() {
            let _ = writeln!(s, "        long long rest = {at};");
        }
        s.push_str(&e.out);
        s.push_str("    }\n");
        Ok((s, Launch::Grid { total }))
    }

    /// One kernel for sibling nodes with the same loops (`sibling_groups`):
    /// one grid-stride loop over their output positions, each member's value
    /// (a reduction in a loop nest and block of its own) stored in its
    /// buffer; terms outside the reductions are computed once.
    fn group(&mut self, members: &[NodeId]) -> Result<(String, Launch), String> {
        let graph = self.graph;
        let first = members[0];
        let node = graph.node(first);
        let NodeKind::Comp(c0) = &node.kind else {
            return Err("internal error: a group of non-comprehensions".into());
        };
        let levels = c0.levels(&node.shape)[..c0.indices.len()].to_vec();
        let total = self.slot(&Self::product(&node.shape));
        let mut s = String::new();
        for (m, id) in members.iter().enumerate() {
            let ty = storage_type(graph.node(*id).dtype);
            let _ = writeln!(s, "    {ty}* __restrict__ out{m} = ({ty}*)bufs[{}];", id.0);
        }
        let _ = writeln!(s, "    const long long total = dims[{total}];");
        let mut e = Emitter::new(self, 2);
        e.output_position(&levels);
        for (m, id) in members.iter().enumerate() {
            let NodeKind::Comp(c) = &graph.node(*id).kind else {
                return Err("internal error: a group of non-comprehensions".into());
            };
            let dtype = graph.node(*id).dtype;
            let rename = graph.renaming(first, *id);
            let body = c.body.subst(&rename);
            let value = match &c.reduce {
                None => {
                    let (v, t) = e.expr(&body);
                    e.convert(&v, t, ty_of(dtype))
                }
                Some(r) => {
                    let var = |v: &IdxVar| match rename.get(v) {
                        Some(Expr::Index(w)) => *w,
                        _ => *v,
                    };
                    let r = crate::ir::Reduce {
                        op: r.op,
                        over: r.over.iter().map(|(v, d)| (var(v), d.clone())).collect(),
                        filter: r.filter.as_ref().map(|f| f.subst(&rename)),
                        empty: r.empty,
                    };
                    e.open("{");
                    let v = e.reduce_loops(&r, &body, dtype)?;
                    e.line(&format!("out{m}[flat] = {};", store(&v, dtype)));
                    e.close("}");
                    continue;
                }
            };
            e.line(&format!("out{m}[flat] = {};", store(&value, dtype)));
        }
        s.push_str(Self::grid_loop_open());
        if !levels.is_empty() {
            s.push_str("        long long rest = flat;\n");
        }
        s.push_str(&e.out);
        s.push_str("    }\n");
        Ok((s, Launch::Grid { total }))
    }

    /// A reduction to a scalar: one block, a strided pass per thread, then a
    /// shared-memory tree in a fixed order.
    /// A reduction by a whole block: to a scalar (one block), or, with an
    /// index space (`rows`), one output element per block in a block-stride
    /// loop. Each thread folds a strided share of the reduced space, then a
    /// shared-memory tree combines the shares in a fixed order.
    fn block_reduce(
        &mut self,
        id: NodeId,
        c: &Comp,
        r: &crate::ir::Reduce,
    ) -> Result<String, String> {
        let node = self.graph.node(id);
        let dtype = node.dtype;
        let rows = !c.indices.is_empty();
        let out_levels = c.levels(&node.shape)[..c.indices.len()].to_vec();
        let ty = storage_type(dtype);
        let mut s = format!("    {ty}* __restrict__ out = ({ty}*)bufs[{}];\n", id.0);
        s.push_str("    const int tid = threadIdx.x;\n");
        let mut ext = Vec::new();
        for d in self.reduced_extents(r) {
            let d = self.dim(&d);
            ext.push(format!("({d} > 0 ? {d} : 0LL)"));
        }
        let rtotal = if ext.is_empty() {
            "1LL".to_string()
        } else {
            ext.join(" * ")
        };
        let _ = writeln!(s, "    const long long rtotal = {rtotal};");
        let ind = if rows {
            let (total, base) = self.out_total(id);
            let _ = writeln!(s, "    const long long total = dims[{total}];");
            if let Some(base) = &base {
                let _ = writeln!(s, "    const long long base = {base};");
            }
            s.push_str(
                "    for (long long o_flat = blockIdx.x; o_flat < total; o_flat += gridDim.x) {\n",
            );
            let at = if base.is_some() {
                "o_flat + base"
            } else {
                "o_flat"
            };
            let _ = writeln!(s, "    long long o_rest = {at};");
            for (k, (v, d)) in out_levels.iter().enumerate().rev() {
                if k == 0 {
                    let _ = writeln!(s, "    const long long v{} = o_rest;", v.0);
                } else {
                    let d = self.dim(d);
                    let _ = writeln!(s, "    const long long v{} = o_rest % {d};", v.0);
                    let _ = writeln!(s, "    o_rest /= {d};");
                }
            }
            at
        } else {
            "0"
        };
        let body_ty = self.body_ty(&c.body);
        let acc = Acc {
            op: r.op,
            dtype,
            body: body_ty,
        };
        // Per-thread state, one pass (two for logsumexp).
        let passes = if r.op == RedOp::LogSumExp { 2 } else { 1 };
        for pass in 0..passes {
            let mut e = Emitter::new(self, 2);
            e.levels = out_levels.iter().chain(&r.over).cloned().collect();
            let rest_used = e.reduced_item(r);
            let item = if r.op == RedOp::Count {
                None
            } else {
                Some(e.expr(&c.body))
            };
            acc.update(&mut e, pass, item, true);
            let inner = e.out;
            acc.declare(&mut s, pass);
            s.push_str("    for (long long flat = tid; flat < rtotal; flat += blockDim.x) {\n");
            if rest_used {
                s.push_str("        long long rest = flat;\n");
            }
            s.push_str(&inner);
            s.push_str("    }\n");
            acc.tree(&mut s, pass);
        }
        let _ = writeln!(s, "    if (tid == 0) {{");
        let result = acc.result(r, dtype);
        let _ = writeln!(s, "        out[{ind}] = {};", store(&result, dtype));
        s.push_str("    }\n");
        if rows {
            // The next element reuses the shared arrays.
            s.push_str("    __syncthreads();\n    }\n");
        }
        Ok(s)
    }

    /// A reduction to a scalar over many blocks: each thread folds a strided
    /// share of the reduced space into a partial state, each block combines
    /// its threads' states in a shared-memory tree and stores the result in
    /// the scratch after the output, and the last block to finish (a ticket
    /// counter) combines the blocks' states in the same tree, in block
    /// order, so the result does not depend on timing. Logsumexp keeps an
    /// online (max, scaled sum, saw-NaN) state; its value is the interpreter's
    /// up to rounding.
    fn grid_reduce(&mut self, id: NodeId, c: &Comp, r: &crate::ir::Reduce) -> String {
        let dtype = self.graph.node(id).dtype;
        let acc = Acc {
            op: r.op,
            dtype,
            body: self.body_ty(&c.body),
        };
        let vt = c_type(acc.item_ty());
        let (g, n) = (SCALAR_GRID, SCALAR_BLOCK);
        let ty = storage_type(dtype);
        let mut s = String::new();
        let _ = writeln!(s, "    {ty}* __restrict__ out = ({ty}*)bufs[{}];", id.0);
        s.push_str("    const int tid = threadIdx.x;\n");
        let _ = writeln!(s, "    char* scratch = (char*)bufs[{}] + 8;", id.0);
        s.push_str("    unsigned long long* ticket = (unsigned long long*)scratch;\n");
        let _ = writeln!(
            s,
            "    volatile long long* p_n = (volatile long long*)(scratch + 8);"
        );
        let _ = writeln!(
            s,
            "    volatile {vt}* p_v = (volatile {vt}*)(scratch + {});",
            8 + 8 * g
        );
        let _ = writeln!(
            s,
            "    volatile long long* p_pos = (volatile long long*)(scratch + {});",
            8 + 16 * g
        );
        let _ = writeln!(
            s,
            "    volatile real* p_s = (volatile real*)(scratch + {});",
            8 + 16 * g
        );
        let _ = writeln!(
            s,
            "    volatile int* p_nan = (volatile int*)(scratch + {});",
            8 + 24 * g
        );
        let mut ext = Vec::new();
        for d in self.reduced_extents(r) {
            let d = self.dim(&d);
            ext.push(format!("({d} > 0 ? {d} : 0LL)"));
        }
        let rtotal = if ext.is_empty() {
            "1LL".to_string()
        } else {
            ext.join(" * ")
        };
        let _ = writeln!(s, "    const long long rtotal = {rtotal};");
        let _ = writeln!(s, "    __shared__ long long s_n[{n}];");
        let _ = writeln!(s, "    __shared__ {vt} s_v[{n}];");
        let _ = writeln!(s, "    __shared__ long long s_pos[{n}];");
        let _ = writeln!(s, "    __shared__ real s_s[{n}];");
        let _ = writeln!(s, "    __shared__ int s_nan[{n}];");
        let _ = writeln!(s, "    __shared__ bool last;");
        // The empty state, then the thread's fold.
        let identity = match r.op {
            RedOp::All => "true".to_string(),
            RedOp::Any => "false".to_string(),
            RedOp::LogSumExp => "-LOSSC_INF".to_string(),
            _ => format!("({vt})0"),
        };
        let _ = writeln!(
            s,
            "    long long n = 0, pos = 0x7fffffffffffffffLL;\n    {vt} v = {identity};\n    real sum = (real)0;\n    int nan = 0;"
        );
        let mut e = Emitter::new(self, 2);
        e.levels = r.over.clone();
        let rest_used = e.reduced_item(r);
        if r.op != RedOp::Count {
            let (x, t) = e.expr(&c.body);
            let x = e.convert(&x, t, acc.item_ty());
            match r.op {
                RedOp::Sum | RedOp::Mean if acc.item_ty() == Ty::I => {
                    e.line(&format!("v = lossc_iadd(v, {x});"))
                }
                RedOp::Sum | RedOp::Mean => e.line(&format!("v += {x};")),
                RedOp::Any => e.line(&format!("v = v || {x};")),
                RedOp::All => e.line(&format!("v = v && {x};")),
                RedOp::Max | RedOp::Min => {
                    let better = better(r.op, acc.item_ty(), &x, "v");
                    e.line(&format!(
                        "if (n == 0 || {better}) {{ v = {x}; pos = flat; }}"
                    ));
                }
                RedOp::LogSumExp => {
                    e.line(&format!("if (lossc_isnan({x})) nan = 1;"));
                    e.line(&format!(
                        "else if ({x} > v) {{ sum = (v == -LOSSC_INF ? (real)1 : sum * exp(v - {x}) + (real)1); v = {x}; }}"
                    ));
                    e.line(&format!("else if ({x} != -LOSSC_INF) sum += exp({x} - v);"));
                }
                RedOp::Count => {}
            }
        }
        e.line("++n;");
        let inner = e.out;
        s.push_str("    for (long long flat = (long long)blockIdx.x * blockDim.x + tid; flat < rtotal; flat += (long long)gridDim.x * blockDim.x) {\n");
        if rest_used {
            s.push_str("        long long rest = flat;\n");
        }
        s.push_str(&inner);
        s.push_str("    }\n");
        s.push_str(
            "    s_n[tid] = n; s_v[tid] = v; s_pos[tid] = pos; s_s[tid] = sum; s_nan[tid] = nan;\n",
        );
        s.push_str("    __syncthreads();\n");
        let tree = self.scalar_tree(&acc);
        s.push_str(&tree);
        s.push_str("    if (tid == 0) {\n");
        s.push_str("        p_n[blockIdx.x] = s_n[0]; p_v[blockIdx.x] = s_v[0]; p_nan[blockIdx.x] = s_nan[0];\n");
        if matches!(r.op, RedOp::Max | RedOp::Min) {
            s.push_str("        p_pos[blockIdx.x] = s_pos[0];\n");
        }
        if r.op == RedOp::LogSumExp {
            s.push_str("        p_s[blockIdx.x] = s_s[0];\n");
        }
        s.push_str("        __threadfence();\n");
        s.push_str(
            "        last = atomicAdd(ticket, 1ULL) == (unsigned long long)gridDim.x - 1ULL;\n",
        );
        s.push_str("    }\n    __syncthreads();\n");
        s.push_str("    if (!last) return;\n");
        s.push_str("    // The last block: combine every block's state, in block order.\n");
        s.push_str("    __threadfence();\n");
        let _ = writeln!(
            s,
            "    if (tid < gridDim.x) {{ s_n[tid] = p_n[tid]; s_v[tid] = p_v[tid]; s_nan[tid] = p_nan[tid]; s_pos[tid] = {}; s_s[tid] = {}; }}",
            if matches!(r.op, RedOp::Max | RedOp::Min) { "p_pos[tid]" } else { "0" },
            if r.op == RedOp::LogSumExp { "p_s[tid]" } else { "(real)0" },
        );
        let _ = writeln!(
            s,
            "    else {{ s_n[tid] = 0; s_v[tid] = {identity}; s_nan[tid] = 0; s_pos[tid] = 0x7fffffffffffffffLL; s_s[tid] = (real)0; }}"
        );
        s.push_str("    __syncthreads();\n");
        s.push_str(&tree);
        if let Some((lo, ..)) = self.range_c().filter(|_| self.range_over().is_some()) {
            // Merge the launch's fold into the running one (module doc);
            // the next block's launch starts a fresh ticket.
            let _ = writeln!(s, "    {vt}* tot_v = ({vt}*)(scratch + {SCALAR_TOTALS});");
            let _ = writeln!(
                s,
                "    long long* tot_n = (long long*)(scratch + {});",
                SCALAR_TOTALS + 8
            );
            let v = if r.op == RedOp::Count {
                "s_n[0]"
            } else {
                "s_v[0]"
            };
            let (stmts, value) = merge_block(
                &acc,
                r,
                dtype,
                &lo,
                v,
                "s_n[0]",
                "out[0]",
                Some(("tot_v[0]", "tot_n[0]")),
            );
            s.push_str("    if (tid == 0) {\n");
            for st in stmts {
                let _ = writeln!(s, "        {st}");
            }
            let _ = writeln!(s, "        out[0] = {};", store(&value, dtype));
            s.push_str("        *ticket = 0ULL;\n    }\n");
            return s;
        }
        let empty = empty_lit(r, dtype);
        let target = ty_of(dtype);
        let value = match r.op {
            RedOp::Count => convert_c("s_n[0]", Ty::I, target),
            RedOp::Any | RedOp::All => convert_c("s_v[0]", Ty::B, target),
            RedOp::Mean => convert_c("(s_v[0] / (real)s_n[0])", Ty::F, target),
            RedOp::LogSumExp => convert_c(
                "(isinf(s_v[0]) ? s_v[0] : (s_nan[0] ? LOSSC_NAN : s_v[0] + log(s_s[0])))",
                Ty::F,
                target,
            ),
            _ => convert_c("s_v[0]", acc.item_ty(), target),
        };
        s.push_str("    if (tid == 0) {\n");
        let _ = writeln!(
            s,
            "        out[0] = {};",
            store(&format!("(s_n[0] == 0 ? {empty} : {value})"), dtype)
        );
        s.push_str("    }\n");
        s
    }

    /// The shared-memory tree of `grid_reduce`: slot `tid` absorbs slot
    /// `tid + w`, the lower slot first (positions break max/min ties).
    fn scalar_tree(&self, acc: &Acc) -> String {
        let combine = match acc.op {
            RedOp::Count => String::new(),
            RedOp::Sum | RedOp::Mean if acc.item_ty() == Ty::I => {
                "s_v[tid] = lossc_iadd(s_v[tid], s_v[tid + w]);".into()
            }
            RedOp::Sum | RedOp::Mean => "s_v[tid] += s_v[tid + w];".into(),
            RedOp::Any => "s_v[tid] = s_v[tid] || s_v[tid + w];".into(),
            RedOp::All => "s_v[tid] = s_v[tid] && s_v[tid + w];".into(),
            RedOp::Max | RedOp::Min => {
                let b = better(acc.op, acc.item_ty(), "s_v[tid + w]", "s_v[tid]");
                let a = better(acc.op, acc.item_ty(), "s_v[tid]", "s_v[tid + w]");
                format!(
                    "if (s_n[tid + w] > 0 && (s_n[tid] == 0 || {b} || (!({a}) && s_pos[tid + w] < s_pos[tid]))) {{ s_v[tid] = s_v[tid + w]; s_pos[tid] = s_pos[tid + w]; }}"
                )
            }
            RedOp::LogSumExp => "{ const real ma = s_v[tid], mb = s_v[tid + w], m = fmax(ma, mb); \
                 s_s[tid] = (ma == -LOSSC_INF ? (real)0 : s_s[tid] * exp(ma - m)) + (mb == -LOSSC_INF ? (real)0 : s_s[tid + w] * exp(mb - m)); \
                 s_v[tid] = m; s_nan[tid] = s_nan[tid] | s_nan[tid + w]; }"
                .into(),
        };
        let mut s = String::new();
        s.push_str("    for (int w = blockDim.x / 2; w > 0; w >>= 1) {\n");
        s.push_str("        if (tid < w) {\n");
        if !combine.is_empty() {
            let _ = writeln!(s, "            {combine}");
        }
        s.push_str("            s_n[tid] += s_n[tid + w];\n");
        s.push_str("        }\n        __syncthreads();\n    }\n");
        s
    }

    /// Whether a reduction with an index space is better done by a block per
    /// output element: its innermost reduced variable indexes the last
    /// (contiguous) dim of some read, so a block's threads read adjacent
    /// elements, and its reduced space is not a short constant.
    fn rows_pay(&self, c: &Comp, r: &crate::ir::Reduce) -> bool {
        let Some((inner, _)) = r.over.last() else {
            return false;
        };
        let short = r
            .over
            .iter()
            .map(|(_, d)| d.as_lit())
            .try_fold(1i64, |a, d| d.map(|d| a.saturating_mul(d)))
            .is_some_and(|n| n < 64);
        let mut contiguous = false;
        let mut visit = |e: &Expr| {
            if let Expr::Read { at, .. } = e {
                if matches!(at.last(), Some(Expr::Index(v)) if v == inner) {
                    contiguous = true;
                }
            }
        };
        c.body.walk(&mut visit);
        if let Some(f) = &r.filter {
            f.walk(&mut visit);
        }
        contiguous && !short
    }

    /// The extents of a reduction's variables in one launch: an
    /// accumulating kernel's ranged variable runs over the block's rows.
    fn reduced_extents(&self, r: &crate::ir::Reduce) -> Vec<Dim> {
        r.over
            .iter()
            .enumerate()
            .map(|(k, (_, d))| match &self.range {
                Some(Range {
                    len, over: Some(o), ..
                }) if *o == k => len.clone(),
                _ => d.clone(),
            })
            .collect()
    }

    fn body_ty(&self, e: &Expr) -> Ty {
        match e {
            Expr::Float(_) => Ty::F,
            Expr::Int(_) | Expr::Index(_) | Expr::Size(_) => Ty::I,
            Expr::Bool(_) => Ty::B,
            Expr::Read { node, .. } => ty_of(self.graph.node(*node).dtype),
            Expr::Unary(op, a) => unary_ty(*op, self.body_ty(a)),
            Expr::Binary(op, a, b) => binary_ty(*op, self.body_ty(a), self.body_ty(b)),
            Expr::Select(_, a, _) => self.body_ty(a),
        }
    }

    /// A contraction as a tiled kernel, when every operand extent provably
    /// fits its read dim (otherwise the generic kernel checks each read).
    fn tiled(
        &mut self,
        id: NodeId,
        con: &crate::ir::contraction::Contraction,
    ) -> Option<(String, Launch)> {
        let node = self.graph.node(id);
        let (bdim, mdim, ndim) = match (con.batched, node.shape.as_slice()) {
            (false, [m, n]) => (None, m.clone(), n.clone()),
            (true, [b, m, n]) => (Some(b.clone()), m.clone(), n.clone()),
            _ => return None,
        };
        let extent = |role: crate::ir::contraction::Role, outer: &Dim| match role {
            crate::ir::contraction::Role::Batch => bdim.clone().unwrap_or(Dim::lit(1)),
            crate::ir::contraction::Role::Outer => outer.clone(),
            crate::ir::contraction::Role::K => con.k.clone(),
        };
        // Strides (symbolic) of each role of an operand.
        let mut strides = |op: &crate::ir::contraction::Operand, outer: &Dim| -> Option<[Dim; 3]> {
            let shape = self.graph.node(op.node).shape.clone();
            if shape.len() != op.roles.len() {
                return None;
            }
            let mut out = [Dim::lit(0), Dim::lit(0), Dim::lit(0)];
            for (k, role) in op.roles.iter().enumerate() {
                if !self.prove(extent(*role, outer), &shape[k]) {
                    return None;
                }
                out[*role as usize] = Self::product(&shape[k + 1..]);
            }
            Some(out)
        };
        let sa = strides(&con.a, &mdim)?;
        let sb = strides(&con.b, &ndim)?;
        let (m, n, k) = (self.dim(&mdim), self.dim(&ndim), self.dim(&con.k));
        let nb = match &bdim {
            Some(b) => self.dim(b),
            None => "1LL".into(),
        };
        let st = |g: &mut Self, d: &Dim| g.dim(d);
        let (sab, sai, sak) = (st(self, &sa[0]), st(self, &sa[1]), st(self, &sa[2]));
        let (sbb, sbj, sbk) = (st(self, &sb[0]), st(self, &sb[1]), st(self, &sb[2]));
        // TILE × TILE threads; each computes a MICRO × MICRO block of a
        // (TILE·MICRO)² output tile, rows ty + TILE·i and columns tx + TILE·j
        // (so shared reads broadcast or hit distinct banks and stores
        // coalesce); k advances TILE at a time through shared memory, each
        // output summing in k order.
        let (t, mt, side) = (TILE, MICRO, TILE * MICRO);
        let loads = side * t / (t * t);
        let empty = float_lit(con.empty);
        // A ranged kernel runs over the block's rows `lo .. hi` of one
        // role: the output rows or batches (row-local), or k (accumulating).
        let range = self.range_c();
        let ranged_role = match (&range, self.range_over(), con.batched) {
            (None, ..) => None,
            (Some(_), Some(_), _) => Some(crate::ir::contraction::Role::K),
            (Some(_), None, true) => Some(crate::ir::contraction::Role::Batch),
            (Some(_), None, false) => Some(crate::ir::contraction::Role::Outer),
        };
        let bounds = |role| {
            if ranged_role == Some(role) {
                ("lo", "hi")
            } else {
                match role {
                    crate::ir::contraction::Role::Batch => ("0", "NB"),
                    crate::ir::contraction::Role::Outer => ("0", "M"),
                    crate::ir::contraction::Role::K => ("0", "K"),
                }
            }
        };
        let (b_lo, b_hi) = bounds(crate::ir::contraction::Role::Batch);
        let (m_lo, m_hi) = bounds(crate::ir::contraction::Role::Outer);
        let (k_lo, k_hi) = bounds(crate::ir::contraction::Role::K);
        let from = |lo: &str| {
            if lo == "0" {
                String::new()
            } else {
                format!("{lo} + ")
            }
        };
        let mut s = String::new();
        let _ = writeln!(s, "    real* __restrict__ out = (real*)bufs[{}];", id.0);
        let (ta, tb) = (self.elem_type(con.a.node), self.elem_type(con.b.node));
        let _ = writeln!(
            s,
            "    const {ta}* __restrict__ A = (const {ta}*)bufs[{}];",
            con.a.node.0
        );
        let _ = writeln!(
            s,
            "    const {tb}* __restrict__ B = (const {tb}*)bufs[{}];",
            con.b.node.0
        );
        let load_a = self.widen(
            con.a.node,
            format!("A[b * {sab} + gr * {sai} + gk * {sak}]"),
        );
        let load_b = self.widen(
            con.b.node,
            format!("B[b * {sbb} + gc * {sbj} + gk * {sbk}]"),
        );
        let _ = writeln!(
            s,
            "    const long long M = {m}, N = {n}, K = {k}, NB = {nb};"
        );
        if let Some((lo, hi, _)) = &range {
            let _ = writeln!(s, "    const long long lo = {lo}, hi = {hi};");
        }
        let _ = writeln!(s, "    __shared__ real As[{t}][{}];", side + 1);
        let _ = writeln!(s, "    __shared__ real Bs[{t}][{}];", side + 1);
        let _ = writeln!(
            s,
            "    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * {t} + tx;"
        );
        let _ = writeln!(
            s,
            "    for (long long b = {}blockIdx.z; b < {b_hi}; b += gridDim.z) {{",
            from(b_lo)
        );
        let _ = writeln!(
            s,
            "    for (long long r0 = {}(long long)blockIdx.y * {side}; r0 < {m_hi}; r0 += (long long)gridDim.y * {side}) {{",
            from(m_lo)
        );
        let _ = writeln!(
            s,
            "    for (long long c0 = (long long)blockIdx.x * {side}; c0 < N; c0 += (long long)gridDim.x * {side}) {{"
        );
        let _ = writeln!(s, "        real acc[{mt}][{mt}];");
        let _ = writeln!(s, "        #pragma unroll");
        let _ = writeln!(
            s,
            "        for (int i = 0; i < {mt}; ++i) for (int j = 0; j < {mt}; ++j) acc[i][j] = (real)0;"
        );
        let _ = writeln!(
            s,
            "        for (long long k0 = {k_lo}; k0 < {k_hi}; k0 += {t}) {{"
        );
        let _ = writeln!(s, "            #pragma unroll");
        let _ = writeln!(s, "            for (int q = 0; q < {loads}; ++q) {{");
        // Consecutive threads load consecutive addresses: along k when k is
        // the operand's contiguous dim, along the rows when they are.
        let mapping = |outer_stride: &str| {
            if outer_stride == "1LL" {
                format!("r = e % {side}, kk = e / {side}")
            } else {
                format!("r = e / {t}, kk = e % {t}")
            }
        };
        let _ = writeln!(s, "                const int e = tid + {} * q;", t * t);
        let _ = writeln!(s, "                {{");
        let _ = writeln!(s, "                    const int {};", mapping(&sai));
        let _ = writeln!(
            s,
            "                    const long long gk = k0 + kk, gr = r0 + r;"
        );
        let _ = writeln!(
            s,
            "                    As[kk][r] = (gr < {m_hi} && gk < {k_hi}) ? {load_a} : (real)0;"
        );
        let _ = writeln!(s, "                }}");
        let _ = writeln!(s, "                {{");
        let _ = writeln!(s, "                    const int {};", mapping(&sbj));
        let _ = writeln!(
            s,
            "                    const long long gk = k0 + kk, gc = c0 + r;"
        );
        let _ = writeln!(
            s,
            "                    Bs[kk][r] = (gc < N && gk < {k_hi}) ? {load_b} : (real)0;"
        );
        let _ = writeln!(s, "                }}");
        let _ = writeln!(s, "            }}");
        let _ = writeln!(s, "            __syncthreads();");
        let _ = writeln!(s, "            #pragma unroll");
        let _ = writeln!(s, "            for (int kk = 0; kk < {t}; ++kk) {{");
        let _ = writeln!(s, "                real a[{mt}], v[{mt}];");
        let _ = writeln!(s, "                #pragma unroll");
        let _ = writeln!(
            s,
            "                for (int i = 0; i < {mt}; ++i) {{ a[i] = As[kk][ty + {t} * i]; v[i] = Bs[kk][tx + {t} * i]; }}"
        );
        let _ = writeln!(s, "                #pragma unroll");
        let _ = writeln!(
            s,
            "                for (int i = 0; i < {mt}; ++i) for (int j = 0; j < {mt}; ++j) acc[i][j] += a[i] * v[j];"
        );
        let _ = writeln!(s, "            }}");
        let _ = writeln!(s, "            __syncthreads();");
        let _ = writeln!(s, "        }}");
        let _ = writeln!(s, "        #pragma unroll");
        let _ = writeln!(
            s,
            "        for (int i = 0; i < {mt}; ++i) for (int j = 0; j < {mt}; ++j) {{"
        );
        let _ = writeln!(
            s,
            "            const long long row = r0 + ty + {t} * i, col = c0 + tx + {t} * j;"
        );
        let value = if ranged_role == Some(crate::ir::contraction::Role::K) {
            // Accumulating: the first block starts the sum (module doc).
            format!("lo == 0 ? (hi > 0 ? acc[i][j] : {empty}) : out[(b * M + row) * N + col] + acc[i][j]")
        } else {
            format!("K > 0 ? acc[i][j] : {empty}")
        };
        let _ = writeln!(
            s,
            "            if (row < {m_hi} && col < N) out[(b * M + row) * N + col] = {value};"
        );
        let _ = writeln!(s, "        }}");
        s.push_str("    }\n    }\n    }\n");
        let len = self.range.clone().map(|r| r.len);
        let rows_of = |g: &mut Self, role, whole: &Dim| match &len {
            Some(len) if ranged_role == Some(role) => g.slot(len),
            _ => g.slot(whole),
        };
        let launch = Launch::Tiled {
            m: rows_of(self, crate::ir::contraction::Role::Outer, &mdim),
            n: self.slot(&ndim),
            batch: bdim
                .as_ref()
                .map(|b| rows_of(self, crate::ir::contraction::Role::Batch, b)),
        };
        Some((s, launch))
    }

    fn concat(&mut self, id: NodeId, axis: usize, parts: &[NodeId]) -> (String, Launch) {
        let node = self.graph.node(id);
        let (mut s, total) = self.out_decl(id);
        let inner = self.dim(&Self::product(&node.shape[axis + 1..]));
        let len = self.dim(&node.shape[axis]);
        s.push_str(Self::grid_loop_open());
        let _ = writeln!(s, "        const long long in = flat % {inner};");
        let _ = writeln!(s, "        const long long x = (flat / {inner}) % {len};");
        let _ = writeln!(s, "        const long long o = flat / {inner} / {len};");
        let mut start = Dim::lit(0);
        for (k, p) in parts.iter().enumerate() {
            let plen = self.graph.node(*p).shape[axis].clone();
            let end = start.add(&plen);
            let (b, e, pl) = (self.dim(&start), self.dim(&end), self.dim(&plen));
            let cond = if parts.len() == 1 {
                String::new()
            } else if k + 1 == parts.len() {
                "else".to_string()
            } else if k == 0 {
                format!("if (x < {e})")
            } else {
                format!("else if (x < {e})")
            };
            let load = self.widen(
                *p,
                format!(
                    "((const {}*)bufs[{}])[(o * {pl} + (x - {b})) * {inner} + in]",
                    self.elem_type(*p),
                    p.0
                ),
            );
            let _ = writeln!(s, "        {cond} out[flat] = {load};");
            start = end;
        }
        s.push_str("    }\n");
        (s, Launch::Grid { total })
    }

    fn slice(&mut self, id: NodeId, src: NodeId, axis: usize, start: &Dim) -> (String, Launch) {
        let node = self.graph.node(id);
        let src_len = self.graph.node(src).shape[axis].clone();
        let (mut s, total) = self.out_decl(id);
        let inner = self.dim(&Self::product(&node.shape[axis + 1..]));
        let len = self.dim(&node.shape[axis]);
        let (sl, b) = (self.dim(&src_len), self.dim(start));
        s.push_str(Self::grid_loop_open());
        let _ = writeln!(s, "        const long long in = flat % {inner};");
        let _ = writeln!(s, "        const long long x = (flat / {inner}) % {len};");
        let _ = writeln!(s, "        const long long o = flat / {inner} / {len};");
        let load = self.widen(
            src,
            format!(
                "((const {}*)bufs[{}])[(o * {sl} + x + {b}) * {inner} + in]",
                self.elem_type(src),
                src.0
            ),
        );
        let _ = writeln!(s, "        out[flat] = {load};");
        s.push_str("    }\n");
        (s, Launch::Grid { total })
    }

    fn reshape(&mut self, id: NodeId, src: NodeId) -> (String, Launch) {
        let (mut s, total) = self.out_decl(id);
        s.push_str(Self::grid_loop_open());
        let load = self.widen(
            src,
            format!("((const {}*)bufs[{}])[flat]", self.elem_type(src), src.0),
        );
        let _ = writeln!(s, "        out[flat] = {load};");
        s.push_str("    }\n");
        (s, Launch::Grid { total })
    }
}

/// A reduction's empty value as C source of the node's type.
fn empty_lit(r: &crate::ir::Reduce, dtype: DType) -> String {
    match dtype {
        DType::Float => float_lit(r.empty),
        DType::Int => format!("{}LL", r.empty as i64),
        DType::Bool => (r.empty != 0.0).to_string(),
    }
}

/// An accumulating reduction keeps a running fold and count: a mean, or an
/// empty value other than the fold of nothing (0).
fn needs_state(r: &crate::ir::Reduce) -> bool {
    r.op == RedOp::Mean || r.empty != 0.0
}

/// The statements that merge a block's fold `v` (of the item type; the
/// count for `count`) and count `n` into an accumulating node whose value
/// is at `out_at`, and the merged value as C source of the node's type. The
/// first block (`lo == 0`) starts afresh. With `state` (`needs_state`) the
/// running fold and count live there; without, the value is the fold.
#[allow(clippy::too_many_arguments)]
fn merge_block(
    acc: &Acc,
    r: &crate::ir::Reduce,
    dtype: DType,
    lo: &str,
    v: &str,
    n: &str,
    out_at: &str,
    state: Option<(&str, &str)>,
) -> (Vec<String>, String) {
    let target = ty_of(dtype);
    let item = if r.op == RedOp::Count {
        Ty::I
    } else {
        acc.item_ty()
    };
    let add = |a: &str, b: &str, t: Ty| {
        if t == Ty::I {
            format!("lossc_iadd({a}, {b})")
        } else {
            format!("({a} + {b})")
        }
    };
    let Some((sv, sn)) = state else {
        let x = convert_c(v, item, target);
        return (
            vec![],
            format!("({lo} == 0 ? {x} : {})", add(out_at, &x, target)),
        );
    };
    let stmts = vec![
        format!("if ({lo} == 0) {{ {sv} = {v}; {sn} = {n}; }}"),
        format!("else {{ {sv} = {}; {sn} += {n}; }}", add(sv, v, item)),
    ];
    let value = match r.op {
        RedOp::Mean => convert_c(&format!("({sv} / (real){sn})"), Ty::F, target),
        _ => convert_c(sv, item, target),
    };
    (
        stmts,
        format!("({sn} == 0 ? {} : {value})", empty_lit(r, dtype)),
    )
}

/// `value` (already of the node's type) as the buffer's storage type.
fn store(value: &str, dtype: DType) -> String {
    match dtype {
        DType::Bool => format!("(unsigned char)({value})"),
        _ => value.to_string(),
    }
}

/// The accumulator of one reduction kind.
struct Acc {
    op: RedOp,
    dtype: DType,
    body: Ty,
}

impl Acc {
    /// The C type items are folded in.
    fn item_ty(&self) -> Ty {
        match self.op {
            RedOp::Count => Ty::I,
            RedOp::Any | RedOp::All => Ty::B,
            RedOp::Sum if self.dtype == DType::Int => Ty::I,
            RedOp::Max | RedOp::Min if self.body == Ty::I => Ty::I,
            _ => Ty::F,
        }
    }

    /// Shared arrays and the per-thread state of `pass` (block reduction).
    fn declare(&self, s: &mut String, pass: usize) {
        let t = c_type(self.item_ty());
        let n = SCALAR_BLOCK;
        if pass == 0 {
            let _ = writeln!(s, "    __shared__ long long s_n[{n}];");
            let _ = writeln!(s, "    long long n = 0;");
        }
        match self.op {
            RedOp::Count => {}
            RedOp::Max | RedOp::Min => {
                let _ = writeln!(s, "    __shared__ {t} s_v[{n}];");
                let _ = writeln!(s, "    __shared__ long long s_pos[{n}];");
                let _ = writeln!(s, "    {t} best = 0;");
                let _ = writeln!(s, "    long long pos = 0x7fffffffffffffffLL;");
            }
            RedOp::LogSumExp if pass == 0 => {
                let _ = writeln!(s, "    __shared__ real s_v[{n}];");
                let _ = writeln!(s, "    real m = -LOSSC_INF;");
            }
            RedOp::LogSumExp => {
                let _ = writeln!(s, "    const real mx = s_v[0];");
                let _ = writeln!(s, "    __syncthreads();");
                let _ = writeln!(s, "    real acc = (real)0;");
            }
            RedOp::Any => {
                let _ = writeln!(s, "    __shared__ bool s_v[{n}];");
                let _ = writeln!(s, "    bool acc = false;");
            }
            RedOp::All => {
                let _ = writeln!(s, "    __shared__ bool s_v[{n}];");
                let _ = writeln!(s, "    bool acc = true;");
            }
            RedOp::Sum | RedOp::Mean => {
                let _ = writeln!(s, "    __shared__ {t} s_v[{n}];");
                let _ = writeln!(s, "    {t} acc = 0;");
            }
        }
    }

    /// The update of one item that passed the filter. In a block reduction
    /// `flat` is the item's position in the reduced space.
    fn update(&self, e: &mut Emitter, pass: usize, item: Option<(String, Ty)>, block: bool) {
        let Some((v, t)) = item else {
            e.line("++n;");
            return;
        };
        match self.op {
            RedOp::Count => e.line("++n;"),
            RedOp::Sum | RedOp::Mean => {
                let x = e.convert(&v, t, self.item_ty());
                if self.item_ty() == Ty::I {
                    e.line(&format!("acc = lossc_iadd(acc, {x});"));
                } else {
                    e.line(&format!("acc += {x};"));
                }
                e.line("++n;");
            }
            RedOp::Any => {
                let x = e.convert(&v, t, Ty::B);
                e.line(&format!("acc = acc || {x};"));
                e.line("++n;");
            }
            RedOp::All => {
                let x = e.convert(&v, t, Ty::B);
                e.line(&format!("acc = acc && {x};"));
                e.line("++n;");
            }
            RedOp::Max | RedOp::Min => {
                let x = e.convert(&v, t, self.item_ty());
                let better = better(self.op, self.item_ty(), &x, "best");
                e.line(&format!("if (n == 0 || {better}) {{"));
                e.line(&format!("    best = {x};"));
                if block {
                    e.line("    pos = flat;");
                }
                e.line("}");
                e.line("++n;");
            }
            RedOp::LogSumExp => {
                let x = e.convert(&v, t, Ty::F);
                if pass == 0 {
                    e.line(&format!("m = fmax(m, {x});"));
                    e.line("++n;");
                } else {
                    e.line(&format!("acc += exp({x} - mx);"));
                }
            }
        }
    }

    /// Writes the thread's state to shared memory and combines it in a tree.
    fn tree(&self, s: &mut String, pass: usize) {
        let combine = match (self.op, pass) {
            (RedOp::Count, _) => "",
            (RedOp::Max | RedOp::Min, _) => "MAXMIN",
            (RedOp::LogSumExp, 0) => "s_v[tid] = fmax(s_v[tid], s_v[tid + w]);",
            (RedOp::Any, _) => "s_v[tid] = s_v[tid] || s_v[tid + w];",
            (RedOp::All, _) => "s_v[tid] = s_v[tid] && s_v[tid + w];",
            (RedOp::Sum, _) if self.item_ty() == Ty::I => {
                "s_v[tid] = lossc_iadd(s_v[tid], s_v[tid + w]);"
            }
            _ => "s_v[tid] += s_v[tid + w];",
        };
        if pass == 0 {
            s.push_str("    s_n[tid] = n;\n");
        }
        match (self.op, pass) {
            (RedOp::Count, _) => {}
            (RedOp::Max | RedOp::Min, _) => s.push_str(
                "    s_v[tid] = best;\n    s_pos[tid] = n > 0 ? pos : 0x7fffffffffffffffLL;\n",
            ),
            (RedOp::LogSumExp, 0) => s.push_str("    s_v[tid] = m;\n"),
            _ => s.push_str("    s_v[tid] = acc;\n"),
        }
        s.push_str("    __syncthreads();\n");
        // blockDim.x is a power of two, at most SCALAR_BLOCK (the shared
        // arrays' size).
        s.push_str("    for (int w = blockDim.x / 2; w > 0; w >>= 1) {\n");
        s.push_str("        if (tid < w) {\n");
        if combine == "MAXMIN" {
            s.push_str("            const bool a_has = s_n[tid] > 0, b_has = s_n[tid + w] > 0;\n");
            let b_better = better(self.op, self.item_ty(), "s_v[tid + w]", "s_v[tid]");
            let a_better = better(self.op, self.item_ty(), "s_v[tid]", "s_v[tid + w]");
            let _ = writeln!(
                s,
                "            if (b_has && (!a_has || {b_better} || (!({a_better}) && s_pos[tid + w] < s_pos[tid]))) {{"
            );
            s.push_str("                s_v[tid] = s_v[tid + w];\n                s_pos[tid] = s_pos[tid + w];\n            }\n");
        } else if !combine.is_empty() {
            let _ = writeln!(s, "            {combine}");
        }
        if pass == 0 {
            s.push_str("            s_n[tid] += s_n[tid + w];\n");
        }
        s.push_str("        }\n        __syncthreads();\n    }\n");
    }

    /// The C expression of the reduction's value (block reduction, thread 0),
    /// of the node's type.
    fn result(&self, r: &crate::ir::Reduce, dtype: DType) -> String {
        let empty = empty_lit(r, dtype);
        let target = ty_of(dtype);
        let value = match self.op {
            RedOp::Count => convert_c("s_n[0]", Ty::I, target),
            RedOp::Any | RedOp::All => convert_c("s_v[0]", Ty::B, target),
            RedOp::Mean => convert_c("(s_v[0] / (real)s_n[0])", Ty::F, target),
            RedOp::LogSumExp => convert_c("(isinf(mx) ? mx : mx + log(s_v[0]))", Ty::F, target),
            _ => convert_c("s_v[0]", self.item_ty(), target),
        };
        format!("(s_n[0] == 0 ? {empty} : {value})")
    }
}

/// `x` is a better extreme than `best` (first extreme wins; NaN beats a number).
fn better(op: RedOp, t: Ty, x: &str, best: &str) -> String {
    let cmp = if op == RedOp::Max { ">" } else { "<" };
    if t == Ty::I {
        format!("({x} {cmp} {best})")
    } else {
        format!("((lossc_isnan({x}) && !lossc_isnan({best})) || {x} {cmp} {best})")
    }
}

/// The interpreter's `as_f` / `as_i` / `as_b` in C.
fn convert_c(v: &str, from: Ty, to: Ty) -> String {
    match (from, to) {
        (a, b) if a == b => v.to_string(),
        (Ty::I, Ty::F) => format!("((real){v})"),
        (Ty::B, Ty::F) => format!("({v} ? (real)1 : (real)0)"),
        (Ty::F, Ty::I) => format!("lossc_to_int({v})"),
        (Ty::B, Ty::I) => format!("({v} ? 1LL : 0LL)"),
        (Ty::F, Ty::B) => format!("({v} != (real)0)"),
        (Ty::I, Ty::B) => format!("({v} != 0LL)"),
        _ => v.to_string(),
    }
}

/// Emits the statements of one kernel body: scalar expressions as named
/// temporaries, each sub-expression once per scope.
struct Emitter<'g, 'a> {
    g: &'g mut Gen<'a>,
    out: String,
    indent: usize,
    tmp: usize,
    /// Index variables bound by the kernel's loops, with their extents.
    levels: Vec<(IdxVar, Dim)>,
    /// Memo of emitted sub-expressions, innermost scope last.
    scopes: Vec<HashMap<String, (String, Ty)>>,
}

impl<'g, 'a> Emitter<'g, 'a> {
    /// Binds the output loop variables `levels` (outermost first) from the
    /// flat output position `rest` (the last varies fastest).
    fn output_position(&mut self, levels: &[(IdxVar, Dim)]) {
        self.levels = levels.to_vec();
        for (k, (v, d)) in levels.iter().enumerate().rev() {
            if k == 0 {
                self.line(&format!("const long long v{} = rest;", v.0));
            } else {
                let d = self.g.dim(d);
                self.line(&format!("const long long v{} = rest % {d};", v.0));
                self.line(&format!("rest /= {d};"));
            }
        }
    }

    /// Decodes the flat reduced position `rest` into the reduced variables
    /// (the last varies fastest), then skips the element when the filter
    /// rejects it. Whether `rest` was used.
    fn reduced_item(&mut self, r: &crate::ir::Reduce) -> bool {
        let extents = self.g.reduced_extents(r);
        let ranged = self.g.range_over();
        let lo = match self.g.range_c() {
            Some((lo, ..)) if ranged.is_some() => lo,
            _ => String::new(),
        };
        for (k, (v, _)) in r.over.iter().enumerate().rev() {
            let first = if ranged == Some(k) {
                format!("{lo} + ")
            } else {
                String::new()
            };
            if k == 0 {
                self.line(&format!("const long long v{} = {first}rest;", v.0));
            } else {
                let d = self.g.dim(&extents[k]);
                self.line(&format!("const long long v{} = {first}rest % {d};", v.0));
                self.line(&format!("rest /= {d};"));
            }
        }
        if let Some(f) = &r.filter {
            let (fv, ft) = self.expr(f);
            let b = self.convert(&fv, ft, Ty::B);
            self.line(&format!("if (!({b})) continue;"));
        }
        !r.over.is_empty()
    }

    fn new(g: &'g mut Gen<'a>, indent: usize) -> Self {
        Emitter {
            g,
            out: String::new(),
            indent,
            tmp: 0,
            levels: Vec::new(),
            scopes: vec![HashMap::new()],
        }
    }

    fn line(&mut self, s: &str) {
        for _ in 0..self.indent {
            self.out.push_str("    ");
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn fresh(&mut self) -> String {
        self.tmp += 1;
        format!("t{}", self.tmp)
    }

    fn convert(&mut self, v: &str, from: Ty, to: Ty) -> String {
        convert_c(v, from, to)
    }

    fn open(&mut self, head: &str) {
        self.line(head);
        self.indent += 1;
        self.scopes.push(HashMap::new());
    }

    fn close(&mut self, tail: &str) {
        self.scopes.pop();
        self.indent -= 1;
        self.line(tail);
    }

    /// Emits `e` and returns the C expression holding its value and its type.
    fn expr(&mut self, e: &Expr) -> (String, Ty) {
        match e {
            Expr::Float(x) => return (float_lit(*x), Ty::F),
            Expr::Int(n) => return (format!("{n}LL"), Ty::I),
            Expr::Bool(b) => return (b.to_string(), Ty::B),
            Expr::Index(v) => {
                // An unbound variable reads as 0, as in the interpreter.
                let bound = self.levels.iter().any(|(w, _)| w == v);
                return (
                    if bound {
                        format!("v{}", v.0)
                    } else {
                        "0LL".into()
                    },
                    Ty::I,
                );
            }
            Expr::Size(d) => return (self.g.dim(d), Ty::I),
            _ => {}
        }
        let key = format!("{e:?}");
        if let Some(hit) = self.scopes.iter().rev().find_map(|s| s.get(&key)) {
            return hit.clone();
        }
        let result = match e {
            Expr::Read { node, at } => self.read(*node, at),
            Expr::Unary(op, a) => {
                let (a, t) = self.expr(a);
                let ty = unary_ty(*op, t);
                let v = unary_c(*op, &a, t);
                self.bind(ty, &v)
            }
            Expr::Binary(op, a, b) => {
                let (a, ta) = self.expr(a);
                let (b, tb) = self.expr(b);
                self.binary(*op, &a, ta, &b, tb)
            }
            Expr::Select(c, a, b) => {
                let (c, tc) = self.expr(c);
                let c = self.convert(&c, tc, Ty::B);
                let ty = self.g.body_ty(e);
                let name = self.fresh();
                self.line(&format!("{} {name};", c_type(ty)));
                self.open(&format!("if ({c}) {{"));
                let (av, at) = self.expr(a);
                let av = self.convert(&av, at, ty);
                self.line(&format!("{name} = {av};"));
                self.close("} else {");
                self.scopes.push(HashMap::new());
                self.indent += 1;
                let (bv, bt) = self.expr(b);
                let bv = self.convert(&bv, bt, ty);
                self.line(&format!("{name} = {bv};"));
                self.close("}");
                (name, ty)
            }
            _ => unreachable!("leaves return early"),
        };
        if let Some(scope) = self.scopes.last_mut() {
            scope.insert(key, result.clone());
        }
        result
    }

    fn bind(&mut self, ty: Ty, value: &str) -> (String, Ty) {
        let name = self.fresh();
        self.line(&format!("const {} {name} = {value};", c_type(ty)));
        (name, ty)
    }

    fn read(&mut self, node: NodeId, at: &[Expr]) -> (String, Ty) {
        let read = self.g.graph.node(node);
        let shape = read.shape.clone();
        let dtype = read.dtype;
        let mut idx = Vec::new();
        let mut checks = Vec::new();
        for (k, ix) in at.iter().enumerate() {
            let (v, t) = self.expr(ix);
            let v = self.convert(&v, t, Ty::I);
            let bound = match ix {
                Expr::Index(var) => Some(
                    self.levels
                        .iter()
                        .find(|(w, _)| w == var)
                        .map_or(Dim::lit(1), |(_, d)| d.clone()),
                ),
                Expr::Int(c) if *c >= 0 => Some(Dim::lit(c + 1)),
                _ => None,
            };
            let proven = match (bound, shape.get(k)) {
                (Some(b), Some(d)) => self.g.prove(b, d),
                _ => false,
            };
            if !proven {
                checks.push((k, v.clone()));
            }
            idx.push(v);
        }
        let mut offset = String::new();
        for (k, v) in idx.iter().enumerate() {
            let stride = Gen::product(&shape[k + 1..]);
            let s = self.g.dim(&stride);
            if !offset.is_empty() {
                offset.push_str(" + ");
            }
            if s == "1LL" {
                offset.push_str(v);
            } else {
                let _ = write!(offset, "{v} * {s}");
            }
        }
        if offset.is_empty() {
            offset.push('0');
        }
        let ptr = format!("((const {}*)bufs[{}])", self.g.elem_type(node), node.0);
        let load = match dtype {
            DType::Bool => format!("({ptr}[{offset}] != 0)"),
            _ => self.g.widen(node, format!("{ptr}[{offset}]")),
        };
        let ty = ty_of(dtype);
        if checks.is_empty() {
            return self.bind(ty, &load);
        }
        let ok = self.fresh();
        self.line(&format!("bool {ok} = true;"));
        for (k, v) in checks {
            let site = self.g.site(Site::Index { node, dim: k });
            let d = self.g.dim(&shape[k]);
            self.line(&format!(
                "if ({ok} && ({v} < 0 || {v} >= {d})) {{ lossc_fail(err, {site}, {v}, {d}); {ok} = false; }}"
            ));
        }
        let zero = match ty {
            Ty::F => "(real)0",
            Ty::I => "0LL",
            Ty::B => "false",
        };
        self.bind(ty, &format!("{ok} ? {load} : {zero}"))
    }

    fn binary(&mut self, op: BinOp, a: &str, ta: Ty, b: &str, tb: Ty) -> (String, Ty) {
        let ty = binary_ty(op, ta, tb);
        let v = match (ta, tb) {
            (Ty::I, Ty::I) => match op {
                BinOp::Add => format!("lossc_iadd({a}, {b})"),
                BinOp::Sub => format!("lossc_isub({a}, {b})"),
                BinOp::Mul => format!("lossc_imul({a}, {b})"),
                BinOp::Rem | BinOp::FloorDiv => {
                    let (site, f) = if op == BinOp::Rem {
                        (Site::RemByZero, "lossc_rem")
                    } else {
                        (Site::DivByZero, "lossc_div")
                    };
                    let site = self.g.site(site);
                    self.line(&format!("if ({b} == 0) lossc_fail(err, {site}, 0, 0);"));
                    format!("({b} == 0 ? 0LL : {f}({a}, {b}))")
                }
                BinOp::Max | BinOp::ClampMin => format!("({a} >= {b} ? {a} : {b})"),
                BinOp::Min | BinOp::ClampMax => format!("({a} <= {b} ? {a} : {b})"),
                BinOp::Eq => format!("({a} == {b})"),
                BinOp::Ne => format!("({a} != {b})"),
                BinOp::Lt => format!("({a} < {b})"),
                BinOp::Le => format!("({a} <= {b})"),
                BinOp::Gt => format!("({a} > {b})"),
                BinOp::Ge => format!("({a} >= {b})"),
                BinOp::Div | BinOp::Pow | BinOp::And | BinOp::Or => "0LL".into(),
            },
            (Ty::B, Ty::B) => match op {
                BinOp::And => format!("({a} && {b})"),
                BinOp::Or => format!("({a} || {b})"),
                BinOp::Eq => format!("({a} == {b})"),
                _ => format!("({a} != {b})"),
            },
            (Ty::F, Ty::F) => match op {
                BinOp::Add => format!("({a} + {b})"),
                BinOp::Sub => format!("({a} - {b})"),
                BinOp::Mul => format!("({a} * {b})"),
                BinOp::Div => format!("({a} / {b})"),
                BinOp::Pow => format!("pow({a}, {b})"),
                BinOp::Max | BinOp::ClampMin => format!("lossc_max({a}, {b})"),
                BinOp::Min | BinOp::ClampMax => format!("lossc_min({a}, {b})"),
                BinOp::Eq => format!("({a} == {b})"),
                BinOp::Ne => format!("({a} != {b})"),
                BinOp::Lt => format!("({a} < {b})"),
                BinOp::Le => format!("({a} <= {b})"),
                BinOp::Gt => format!("({a} > {b})"),
                BinOp::Ge => format!("({a} >= {b})"),
                BinOp::Rem | BinOp::FloorDiv | BinOp::And | BinOp::Or => "LOSSC_NAN".into(),
            },
            _ => {
                let site = self.g.site(Site::Mixed(op));
                self.line(&format!("lossc_fail(err, {site}, 0, 0);"));
                "LOSSC_NAN".into()
            }
        };
        self.bind(ty, &v)
    }

    /// The reduction loop nest of one output element; returns the C
    /// expression of its value, of the node's type.
    fn reduce_loops(
        &mut self,
        r: &crate::ir::Reduce,
        body: &Expr,
        dtype: DType,
    ) -> Result<String, String> {
        let acc = Acc {
            op: r.op,
            dtype,
            body: self.g.body_ty(body),
        };
        let t = c_type(acc.item_ty());
        self.line("long long n = 0;");
        match r.op {
            RedOp::Count => {}
            RedOp::Max | RedOp::Min => self.line(&format!("{t} best = 0;")),
            RedOp::LogSumExp => self.line("real m = -LOSSC_INF;"),
            RedOp::Any => self.line("bool acc = false;"),
            RedOp::All => self.line("bool acc = true;"),
            RedOp::Sum | RedOp::Mean => self.line(&format!("{t} acc = 0;")),
        }
        let passes = if r.op == RedOp::LogSumExp { 2 } else { 1 };
        for pass in 0..passes {
            if pass == 1 {
                self.line("const real mx = m;");
                self.line("real acc = (real)0;");
                self.open("if (n > 0 && !isinf(mx)) {");
            }
            let outer_levels = self.levels.len();
            let ranged = self.g.range_over();
            for (k, (v, extent)) in r.over.iter().enumerate() {
                let (from, to) = match self.g.range_c() {
                    Some((lo, hi, _)) if ranged == Some(k) => (lo, hi),
                    _ => ("0".to_string(), self.g.dim(extent)),
                };
                self.open(&format!(
                    "for (long long v{0} = {from}; v{0} < {to}; ++v{0}) {{",
                    v.0
                ));
                self.levels.push((*v, extent.clone()));
            }
            if let Some(f) = &r.filter {
                let (fv, ft) = self.expr(f);
                let b = self.convert(&fv, ft, Ty::B);
                self.line(&format!("if (!({b})) continue;"));
            }
            let item = if r.op == RedOp::Count {
                None
            } else {
                Some(self.expr(body))
            };
            acc.update(self, pass, item, false);
            for _ in &r.over {
                self.close("}");
            }
            self.levels.truncate(outer_levels);
            if pass == 1 {
                self.close("}");
            }
        }
        if let Some((lo, ..)) = self.g.range_c().filter(|_| self.g.range_over().is_some()) {
            // An accumulating kernel's element (module doc).
            let v = if r.op == RedOp::Count { "n" } else { "acc" };
            let state = needs_state(r).then_some(("st_v[flat]", "st_n[flat]"));
            let (stmts, value) = merge_block(&acc, r, dtype, &lo, v, "n", "out[flat]", state);
            for st in stmts {
                self.line(&st);
            }
            return Ok(self.bind(ty_of(dtype), &value).0);
        }
        let empty = empty_lit(r, dtype);
        let target = ty_of(dtype);
        let value = match r.op {
            RedOp::Count => convert_c("n", Ty::I, target),
            RedOp::Any | RedOp::All => convert_c("acc", Ty::B, target),
            RedOp::Sum => convert_c("acc", acc.item_ty(), target),
            RedOp::Mean => convert_c("(acc / (real)n)", Ty::F, target),
            RedOp::Max | RedOp::Min => convert_c("best", acc.item_ty(), target),
            RedOp::LogSumExp => convert_c("(isinf(mx) ? mx : mx + log(acc))", Ty::F, target),
        };
        let (name, _) = self.bind(target, &format!("n == 0 ? {empty} : {value}"));
        Ok(name)
    }
}

fn unary_c(op: UnOp, a: &str, t: Ty) -> String {
    match (op, t) {
        (UnOp::Neg, Ty::I) => format!("lossc_isub(0, {a})"),
        (UnOp::Abs, Ty::I) => format!("({a} < 0 ? lossc_isub(0, {a}) : {a})"),
        (UnOp::Not, _) => format!("!{}", convert_c(a, t, Ty::B)),
        (UnOp::ToFloat | UnOp::Detach, _) => convert_c(a, t, Ty::F),
        (op, _) => {
            let x = convert_c(a, t, Ty::F);
            match op {
                UnOp::Neg => format!("(-{x})"),
                UnOp::Abs => format!("fabs({x})"),
                UnOp::Exp => format!("exp({x})"),
                UnOp::Log => format!("log({x})"),
                UnOp::Sqrt => format!("sqrt({x})"),
                UnOp::Relu => format!("lossc_relu({x})"),
                UnOp::Softplus => format!("lossc_softplus({x})"),
                UnOp::LogSigmoid => format!("lossc_log_sigmoid({x})"),
                UnOp::Sigmoid => format!("lossc_sigmoid({x})"),
                UnOp::Tanh => format!("tanh({x})"),
                UnOp::Detach | UnOp::ToFloat | UnOp::Not => x,
            }
        }
    }
}
