//! Contractions through GEMM: a comprehension
//! `out[(b,) i, j] = sum(k) A[..] * B[..]` whose reads are indexed by plain
//! loop variables runs as `matrixmultiply::sgemm` / `dgemm` instead of its
//! compiled loop nest, which walks one operand against its row-major layout
//! and has no blocking or vector kernel.
//!
//! * Recognised (`ir::contraction::recognise`, at compile time): a `Sum` over exactly one
//!   variable `k` with no filter, two or three output indices (`i, j`, or a
//!   batch `b, i, j`), and a body that is exactly `A[..] * B[..]` of two float
//!   reads. Each read's indices are distinct plain index variables: one read
//!   covers exactly `{i, k}` and the other `{j, k}` (plus `b` in both for a
//!   batch), in any order, so transposed operands are expressed through
//!   strides and nothing is copied.
//! * Run (`run`): the strides come from each operand's shape at these sizes
//!   (its buffer is row-major in that shape). When a loop extent exceeds the
//!   dim it indexes, `run` declines and the compiled kernel runs instead, so
//!   the out-of-range diagnostic is the interpreter's.
//! * Values differ from the interpreter only in summation order (blocked,
//!   possibly fused multiply-add). An empty `k` range gives the reduction's
//!   `empty` value, as in the interpreter.
//! * Threads: `run.rs` splits a large contraction into blocks of output rows
//!   on its own thread pool (`RunOptions::threads`), and each block runs
//!   single-threaded: `matrixmultiply` reads `MATMUL_NUM_THREADS` once, and
//!   when it is unset we set it to 1. Its own threads (a second pool beside
//!   the kernels', yielding the CPU in a spin) made small GEMMs slower than
//!   one thread, and a thread count fixed at the first call could not follow
//!   `--threads`.

use super::Precision;
use crate::ir::contraction::{Contraction, Operand, Role};
use crate::ir::NodeId;
use std::sync::Once;

/// Sets `MATMUL_NUM_THREADS` to 1 once, unless the user set it (module doc).
fn configure_threads() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("MATMUL_NUM_THREADS").is_none() {
            std::env::set_var("MATMUL_NUM_THREADS", "1");
        }
    });
}

/// Which part of a contraction to compute (`run.rs`).
#[derive(Clone, Copy, Debug)]
pub(super) enum Part {
    /// All of it, into a buffer of the node's shape.
    Whole,
    /// Output rows `lo .. hi` (not batched), written where row `lo` of the
    /// output lies.
    Rows(usize, usize),
    /// Output columns `cols` of rows `rows` (not batched; a block of a
    /// `Whole` or `Rows` part, on one thread).
    Block {
        rows: (usize, usize),
        cols: (usize, usize),
    },
    /// The terms `k` in `lo .. hi` (not batched), added to the output.
    K(usize, usize),
    /// The terms `k` in `terms`, added to output rows `rows` (a block of a
    /// `K` part, on one thread).
    RowsOfK {
        rows: (usize, usize),
        terms: (usize, usize),
    },
}

/// Strides (in elements) of each role of an operand of row-major `shape`,
/// or `None` when a role's extent does not fit its dim.
fn strides(op: &Operand, shape: &[usize], extent: impl Fn(Role) -> usize) -> Option<[isize; 3]> {
    if shape.len() != op.roles.len() {
        return None;
    }
    // Indexed by role: batch, outer, k.
    let mut out = [0isize; 3];
    let mut stride = 1usize;
    for (role, dim) in op.roles.iter().zip(shape).rev() {
        if extent(*role) > *dim {
            return None;
        }
        out[*role as usize] = isize::try_from(stride).ok()?;
        stride = stride.checked_mul(*dim)?;
    }
    Some(out)
}

/// A contraction's extents at these sizes (batches, rows, columns, terms)
/// and its operands' strides (`strides`).
struct Layout {
    k: usize,
    nb: usize,
    m: usize,
    n: usize,
    sa: [isize; 3],
    sb: [isize; 3],
}

fn layout(
    con: &Contraction,
    sizes: &std::collections::BTreeMap<String, i64>,
    shape: &[usize],
    shapes: &dyn Fn(NodeId) -> Option<Vec<usize>>,
) -> Option<Layout> {
    let k = usize::try_from(con.k.eval(sizes).unwrap_or(-1)).ok()?;
    let (nb, m, n) = match (con.batched, shape) {
        (false, [m, n]) => (1, *m, *n),
        (true, [b, m, n]) => (*b, *m, *n),
        _ => return None,
    };
    let extent = |outer: usize| {
        move |r: Role| match r {
            Role::Batch => nb,
            Role::Outer => outer,
            Role::K => k,
        }
    };
    let sa = shapes(con.a.node).and_then(|s| strides(&con.a, &s, extent(m)))?;
    let sb = shapes(con.b.node).and_then(|s| strides(&con.b, &s, extent(n)))?;
    Some(Layout {
        k,
        nb,
        m,
        n,
        sa,
        sb,
    })
}

/// Whether `run` computes the whole contraction at these sizes rather than
/// declining (module doc).
pub(super) fn accepts(
    con: &Contraction,
    sizes: &std::collections::BTreeMap<String, i64>,
    shape: &[usize],
    shapes: &dyn Fn(NodeId) -> Option<Vec<usize>>,
) -> bool {
    layout(con, sizes, shape, shapes).is_some()
}

/// Computes `part` of the contraction into `c` (the node's buffer, `shape`
/// at these sizes); `false` when it declines (module doc) and the kernel
/// must run.
///
/// # Safety
///
/// `ptrs[n]` is the base of node `n`'s buffer, of precision `p`, holding
/// the elements of `shapes[n]` for both operands (at least the rows or terms
/// `part` touches); `c` likewise for `shape`, in precision `p`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run(
    con: &Contraction,
    p: Precision,
    sizes: &std::collections::BTreeMap<String, i64>,
    shape: &[usize],
    shapes: &dyn Fn(NodeId) -> Option<Vec<usize>>,
    ptrs: &[*mut u8],
    c: *mut u8,
    part: Part,
) -> bool {
    let Some(Layout {
        k,
        nb,
        m,
        n,
        sa,
        sb,
    }) = layout(con, sizes, shape, shapes)
    else {
        return false;
    };
    if con.batched && !matches!(part, Part::Whole) {
        return false;
    }
    // The rows of A and C, the columns of B and C, and the terms of A and
    // B this part covers.
    let all = (0, n);
    let (rows, cols, terms, beta) = match part {
        Part::Whole => ((0, m), all, (0, k), 0.0),
        Part::Rows(lo, hi) if lo <= hi && hi <= m => ((lo, hi), all, (0, k), 0.0),
        Part::Block {
            rows: (lo, hi),
            cols: (clo, chi),
        } if lo <= hi && hi <= m && clo <= chi && chi <= n => ((lo, hi), (clo, chi), (0, k), 0.0),
        Part::K(lo, hi) if lo <= hi && hi <= k => ((0, m), all, (lo, hi), 1.0),
        Part::RowsOfK {
            rows: (lo, hi),
            terms: (klo, khi),
        } if lo <= hi && hi <= m && klo <= khi && khi <= k => ((lo, hi), all, (klo, khi), 1.0),
        _ => return false,
    };
    let (pm, pn, pk) = (rows.1 - rows.0, cols.1 - cols.0, terms.1 - terms.0);
    if nb * pm * pn == 0 {
        return true;
    }
    if pk == 0 {
        if beta != 0.0 {
            return true; // nothing to add
        }
        // The interpreter's value of an empty sum (unbatched: `pk == 0`
        // with a batch is the whole part, rows `0 .. m` of every batch).
        for r in 0..nb * m {
            let at = r * n + cols.0;
            if nb == 1 && (r < rows.0 || r >= rows.1) {
                continue;
            }
            match p {
                Precision::F32 => std::slice::from_raw_parts_mut((c as *mut f32).add(at), pn)
                    .fill(con.empty as f32),
                Precision::F64 => {
                    std::slice::from_raw_parts_mut((c as *mut f64).add(at), pn).fill(con.empty)
                }
            }
        }
        return true;
    }
    configure_threads();
    let (pa, pb) = (ptrs[con.a.node.index()], ptrs[con.b.node.index()]);
    let (mi, ni) = (m as isize, n as isize);
    let (r0, c0, k0) = (rows.0 as isize, cols.0 as isize, terms.0 as isize);
    for bi in 0..nb as isize {
        let oa = bi * sa[0] + r0 * sa[1] + k0 * sa[2];
        let ob = bi * sb[0] + c0 * sb[1] + k0 * sb[2];
        let oc = bi * mi * ni + r0 * ni + c0;
        // A is m × k with strides (outer, k); B is k × n with strides (k, outer).
        match p {
            Precision::F32 => matrixmultiply::sgemm(
                pm,
                pk,
                pn,
                1.0,
                (pa as *const f32).wrapping_offset(oa),
                sa[1],
                sa[2],
                (pb as *const f32).wrapping_offset(ob),
                sb[2],
                sb[1],
                beta as f32,
                (c as *mut f32).wrapping_offset(oc),
                ni,
                1,
            ),
            Precision::F64 => matrixmultiply::dgemm(
                pm,
                pk,
                pn,
                1.0,
                (pa as *const f64).wrapping_offset(oa),
                sa[1],
                sa[2],
                (pb as *const f64).wrapping_offset(ob),
                sb[2],
                sb[1],
                beta,
                (c as *mut f64).wrapping_offset(oc),
                ni,
                1,
            ),
        }
    }
    true
}
