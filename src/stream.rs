//! The streaming schedule: which comprehensions may be computed a block of
//! rows at a time and never materialised, and how the nodes that read them
//! run block by block. Shared by the backends that stream (the JIT and
//! CUDA); each runs the steps `plan` returns with its own kernels.
//!
//! In-batch losses build a `[B, N]` matrix (scores, their softmax, their
//! adjoint) only to reduce it: along its rows (`logsumexp(c) s[i, c]`), along
//! its columns (`sum(i) g[i, c]`), or through a contraction back to `[B, D]`.
//! None of that needs the whole matrix at once. The analysis is general: it
//! knows no loss, only reads.
//!
//! * **Region** (compile time, `analyse`). For a row dim `R`, a rank-2
//!   comprehension of shape `[R, N]` that is no output is *streamable* when
//!   every node reading it is a comprehension that reads it only at its own
//!   *ranged* variable in the first position:
//!   - *row-local*: the reader's first output index ranges over `R` and every
//!     read is `x[i0, ..]` with `i0` that index — row `i0` of the reader
//!     needs only row `i0` of `x`;
//!   - *accumulating*: the reader is a `sum`, `mean` or `count` over a
//!     variable `r` of extent `R` and every read is `x[r, ..]` — the reader
//!     is a sum of per-block parts.
//!
//!   A fixpoint removes candidates with any other reader (a layout node, a
//!   transposed or diagonal read outside the ranged variable, a reader that
//!   would need two different ranged variables). Accumulating readers are
//!   compiled as accumulating kernels (`translate.rs`), whatever the sizes.
//! * **Passes** (run time, `plan`). Given the sizes, the region whose
//!   streamable nodes are large (or, forced, all of them) is chosen; left to
//!   itself (`Auto`), a region that would compute a streamed node in more
//!   than one pass stays whole while its nodes are below the backend's
//!   `recompute_min_bytes`. Its
//!   members (streamed nodes and their readers) run in *passes* over blocks
//!   of rows; everything else runs whole, between passes. A member runs in
//!   the first pass after everything it needs is complete: a node outside
//!   the region, an accumulating member (complete only after its pass), or
//!   a row-local member read at another row. Streamed nodes live only in
//!   per-block tiles and are recomputed in every pass that reads them (the
//!   FlashAttention-style recomputation of the backward). Memory: the tiles,
//!   `tile_rows × N` per streamed node (about 32 MiB in all, at least 256
//!   rows), plus whole buffers for the rest.

use crate::ir::{Dim, Expr, Graph, IdxVar, NodeId, NodeKind, RedOp};
use std::collections::BTreeMap;

/// How a member of a region runs in a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Output rows `lo .. hi` per block.
    RowLocal,
    /// Reduced variable at loop level `level` over `lo .. hi` per block,
    /// added into the output.
    Accumulate { level: usize },
}

/// The streamable nodes of one row dim and the modes of their readers.
#[derive(Clone, Debug)]
pub struct Region {
    pub row: Dim,
    pub streamable: Vec<NodeId>,
    /// Every reader of a streamable node (and every streamable node, which
    /// runs row-local).
    pub modes: BTreeMap<NodeId, Mode>,
}

/// The regions of a graph, and the reduced level each accumulating kernel
/// ranges over.
#[derive(Clone, Debug, Default)]
pub struct Analysis {
    pub regions: Vec<Region>,
    pub ranged_red: Vec<Option<usize>>,
}

/// Every read of `of` in comprehension `reader` (body and filter).
fn reads_of(graph: &Graph, reader: NodeId, of: NodeId) -> Vec<Vec<Expr>> {
    let NodeKind::Comp(c) = &graph.node(reader).kind else {
        return vec![];
    };
    let mut out = Vec::new();
    let mut visit = |e: &Expr| {
        if let Expr::Read { node, at } = e {
            if *node == of {
                out.push(at.clone());
            }
        }
    };
    c.body.walk(&mut visit);
    if let Some(f) = c.reduce.as_ref().and_then(|r| r.filter.as_ref()) {
        f.walk(&mut visit);
    }
    out
}

/// The mode in which `reader` can read `of` a block of rows at a time.
fn mode_of(graph: &Graph, reader: NodeId, of: NodeId, row: &Dim) -> Option<Mode> {
    let node = graph.node(reader);
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let reads = reads_of(graph, reader, of);
    let all_at = |v: IdxVar| {
        reads
            .iter()
            .all(|at| matches!(at.first(), Some(Expr::Index(w)) if *w == v))
    };
    if node.shape.first() == Some(row) && all_at(c.indices[0]) {
        return Some(Mode::RowLocal);
    }
    let r = c.reduce.as_ref()?;
    let accumulable = matches!(
        (r.op, node.dtype),
        (RedOp::Sum, _) | (RedOp::Mean, crate::ir::DType::Float) | (RedOp::Count, _)
    );
    if !accumulable {
        return None;
    }
    r.over.iter().enumerate().find_map(|(k, (v, d))| {
        (d == row && all_at(*v)).then_some(Mode::Accumulate {
            level: c.indices.len() + k,
        })
    })
}

/// The regions of `graph` (module doc).
pub fn analyse(graph: &Graph) -> Analysis {
    let n = graph.nodes.len();
    let mut readers: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    for i in 0..n {
        let id = NodeId(i as u32);
        for op in graph.operands(id) {
            if !readers[op.index()].contains(&id) {
                readers[op.index()].push(id);
            }
        }
    }
    let is_output = |id: NodeId| {
        graph.outputs.iter().any(|(_, o)| *o == id) || graph.grads.iter().any(|(_, g)| *g == id)
    };
    let mut ranged_red: Vec<Option<usize>> = vec![None; n];
    let mut taken = vec![false; n];
    let mut rows: Vec<Dim> = Vec::new();
    for node in &graph.nodes {
        if matches!(node.kind, NodeKind::Comp(_))
            && node.shape.len() == 2
            && !rows.contains(&node.shape[0])
        {
            rows.push(node.shape[0].clone());
        }
    }
    let mut regions = Vec::new();
    for row in rows {
        let mut cand: Vec<NodeId> = (0..n)
            .map(|i| NodeId(i as u32))
            .filter(|id| {
                let node = graph.node(*id);
                matches!(node.kind, NodeKind::Comp(_))
                    && node.shape.len() == 2
                    && node.shape[0] == row
                    && !is_output(*id)
                    && !taken[id.index()]
                    && !readers[id.index()].is_empty()
            })
            .collect();
        let modes = loop {
            let mut modes: BTreeMap<NodeId, Mode> = BTreeMap::new();
            let mut reject = None;
            for &x in &cand {
                modes.insert(x, Mode::RowLocal);
            }
            'scan: for &x in &cand {
                for &reader in &readers[x.index()] {
                    let mode = mode_of(graph, reader, x, &row);
                    let fits = match (mode, modes.get(&reader)) {
                        (None, _) => false,
                        (Some(m), Some(old)) => m == *old,
                        (Some(Mode::Accumulate { level }), None) => {
                            ranged_red[reader.index()].is_none_or(|l| l == level)
                        }
                        (Some(_), None) => true,
                    };
                    if !fits {
                        // A candidate that must accumulate over another
                        // candidate is a sum of its blocks, not a block:
                        // it gives way (its output is the smaller).
                        let reader_gives_way =
                            cand.contains(&reader) && matches!(mode, Some(Mode::Accumulate { .. }));
                        reject = Some(if reader_gives_way { reader } else { x });
                        break 'scan;
                    }
                    modes.insert(reader, mode.expect("checked above"));
                }
            }
            match reject {
                Some(x) => cand.retain(|c| *c != x),
                None => break modes,
            }
        };
        if cand.is_empty() {
            continue;
        }
        for (id, mode) in &modes {
            if let Mode::Accumulate { level } = mode {
                ranged_red[id.index()] = Some(*level);
            }
        }
        for c in &cand {
            taken[c.index()] = true;
        }
        regions.push(Region {
            row,
            streamable: cand,
            modes,
        });
    }
    Analysis {
        regions,
        ranged_red,
    }
}

/// One step of a run: a node computed whole, or a pass over blocks of rows.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Whole(NodeId),
    Pass(Pass),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    /// The region's row dim at these sizes.
    pub rows: usize,
    pub tile_rows: usize,
    /// The nodes computed per block, in graph order, with their modes.
    pub nodes: Vec<(NodeId, Mode)>,
    /// The streamed nodes among them (tiles only).
    pub streamed: Vec<NodeId>,
}

/// How much a run may stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streaming {
    /// Stream the nodes that would take much memory (at least the
    /// backend's `Budget::auto_min_bytes` and more than the inputs' largest
    /// tensor), unless that computes one of them in several passes and
    /// each is smaller than `Budget::recompute_min_bytes`.
    Auto,
    /// Stream everything streamable.
    Always,
    Never,
}

/// How much memory a backend trades for recomputation: the size from which
/// `Auto` streams a node, and the tiles a pass aims for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// A streamed node's size from which `Auto` streams it.
    pub auto_min_bytes: usize,
    /// The size below which `Auto` keeps a region whole when streaming it
    /// would compute some streamed node in more than one pass (the
    /// recomputation costs more than the memory it saves).
    pub recompute_min_bytes: usize,
    /// The bytes of tiles a pass aims for.
    pub tile_bytes: usize,
    /// The fewest rows a block has (unless the row dim is shorter).
    pub min_tile_rows: usize,
}

/// The JIT's budget: a block's contractions run as GEMMs of its rows, and
/// every GEMM call packs its other operand again, so short blocks cost more
/// than memory.
pub const CPU_BUDGET: Budget = Budget {
    auto_min_bytes: 32 << 20,
    // BatchHardTripletLoss at 4096×1024 streams its distances in three
    // passes: 0.68 s streamed, 0.47–0.53 s whole (and less memory, its
    // lowered diagonals never being materialised); MNRL's single pass is
    // faster streamed (0.48 s against 0.68 s whole).
    recompute_min_bytes: 256 << 20,
    tile_bytes: 32 << 20,
    min_tile_rows: 256,
};

/// Rows per streamed block: the caller's choice, else the Cached losses'
/// `mini_batch_size` (a hint in the graph), else `None` (`plan` chooses).
pub fn tile_rows(graph: &Graph, chosen: Option<usize>) -> Option<usize> {
    chosen.or_else(|| {
        graph
            .hints
            .get("mini_batch_size")
            .and_then(|n| usize::try_from(*n).ok())
            .filter(|n| *n > 0)
    })
}

/// The steps of one run at these sizes (module doc). `elems[n]` is node
/// `n`'s element count and `rows_of(dim)` a dim's value; blocks have
/// `tile_rows` rows, or as many as make tiles of about `budget.tile_bytes`
/// (at least `budget.min_tile_rows`).
#[allow(clippy::too_many_arguments)]
pub fn plan(
    graph: &Graph,
    analysis: &Analysis,
    streaming: Streaming,
    tile_rows: Option<usize>,
    budget: Budget,
    elems: &[usize],
    elem_bytes: usize,
    rows_of: &dyn Fn(&Dim) -> usize,
) -> Vec<Step> {
    let n = graph.nodes.len();
    let whole = || (0..n).map(|i| Step::Whole(NodeId(i as u32))).collect();
    let largest_input = graph
        .inputs()
        .map(|(id, ..)| elems[id.index()])
        .max()
        .unwrap_or(0);
    let pick = |r: &Region| -> Vec<NodeId> {
        r.streamable
            .iter()
            .copied()
            .filter(|id| analysis.ranged_red[id.index()].is_none())
            .filter(|id| match streaming {
                Streaming::Always => true,
                Streaming::Never => false,
                Streaming::Auto => {
                    let e = elems[id.index()];
                    e * elem_bytes >= budget.auto_min_bytes && e > largest_input
                }
            })
            .collect()
    };
    let Some((region, streamed)) = analysis
        .regions
        .iter()
        .map(|r| (r, pick(r)))
        .filter(|(_, s)| !s.is_empty())
        .max_by_key(|(_, s)| s.iter().map(|id| elems[id.index()]).sum::<usize>())
    else {
        return whole();
    };
    let rows = rows_of(&region.row);
    if rows == 0 {
        return whole();
    }
    let is_streamed = |id: NodeId| streamed.contains(&id);
    // Members: the streamed nodes and everything that reads one.
    let mut mode: Vec<Option<Mode>> = vec![None; n];
    for (id, m) in &region.modes {
        let reads_streamed = graph.operands(*id).iter().any(|o| is_streamed(*o));
        if is_streamed(*id) || reads_streamed {
            mode[id.index()] = Some(*m);
        }
    }
    // And the row-local followers of members: a node over the region's rows
    // that reads members only at its own row (a softmax's factor from the
    // row's maximum and sum) runs in the pass of the members it reads, so
    // that it does not hold back what reads it to a later pass. One that
    // would need a later pass than theirs runs whole instead.
    let mut follower = vec![false; n];
    for (i, node) in graph.nodes.iter().enumerate() {
        let NodeKind::Comp(c) = &node.kind else {
            continue;
        };
        let id = NodeId(i as u32);
        if mode[i].is_some() || node.shape.first() != Some(&region.row) {
            continue;
        }
        let row = c.indices.first().copied();
        let members: Vec<NodeId> = graph
            .operands(id)
            .into_iter()
            .filter(|d| mode[d.index()].is_some())
            .collect();
        let row_local = !members.is_empty()
            && members.iter().all(|d| {
                mode[d.index()] == Some(Mode::RowLocal)
                    && reads_of(graph, id, *d).iter().all(|at| {
                        matches!((at.first(), row), (Some(Expr::Index(w)), Some(v)) if *w == v)
                    })
            });
        if row_local {
            mode[i] = Some(Mode::RowLocal);
            follower[i] = true;
        }
    }
    // Only followers that a member reads (or a follower that one reads):
    // the others gain nothing in the pass and would hold their buffers
    // through it.
    let mut read_by_member = vec![false; n];
    for i in (0..n).rev() {
        let id = NodeId(i as u32);
        if follower[i] && !read_by_member[i] {
            follower[i] = false;
            mode[i] = None;
        }
        if mode[i].is_some() {
            for d in graph.operands(id) {
                read_by_member[d.index()] = true;
            }
        }
    }
    // `after[x]`: passes that must precede a whole node; `pass[x]`: a member's.
    let mut after = vec![0usize; n];
    let mut pass = vec![0usize; n];
    for i in 0..n {
        let id = NodeId(i as u32);
        let ranged = match &graph.node(id).kind {
            NodeKind::Comp(c) => match mode[i] {
                Some(Mode::RowLocal) => c.indices.first().copied(),
                Some(Mode::Accumulate { level }) => {
                    c.reduce.as_ref().map(|r| r.over[level - c.indices.len()].0)
                }
                None => None,
            },
            _ => None,
        };
        let need_of = |mode: &[Option<Mode>], pass: &[usize], i: usize| {
            let mut need = 0;
            for d in graph.operands(id) {
                let j = d.index();
                need = need.max(match (mode[i], mode[j]) {
                    (_, None) => after[j],
                    (None, Some(_)) => pass[j] + 1,
                    (Some(_), Some(Mode::Accumulate { .. })) => pass[j] + 1,
                    (Some(_), Some(Mode::RowLocal)) => {
                        let same_row = reads_of(graph, id, d).iter().all(|at| {
                        matches!((at.first(), ranged), (Some(Expr::Index(w)), Some(v)) if *w == v)
                    });
                        if same_row || is_streamed(d) {
                            pass[j]
                        } else {
                            pass[j] + 1
                        }
                    }
                });
            }
            need
        };
        let mut need = need_of(&mode, &pass, i);
        if follower[i] {
            let theirs = graph
                .operands(id)
                .iter()
                .filter(|d| mode[d.index()].is_some())
                .map(|d| pass[d.index()])
                .max();
            // (It reads no member if those it followed run whole.)
            if theirs.is_none_or(|p| need > p) {
                mode[i] = None;
                need = need_of(&mode, &pass, i);
            }
        }
        if mode[i].is_some() {
            pass[i] = need;
        } else {
            after[i] = need;
        }
    }
    let passes = (0..n)
        .filter(|i| mode[*i].is_some())
        .map(|i| pass[i] + 1)
        .max()
        .unwrap_or(0);
    let mut steps = Vec::new();
    for q in 0..=passes {
        for i in 0..n {
            if mode[i].is_none() && after[i] == q {
                steps.push(Step::Whole(NodeId(i as u32)));
            }
        }
        if q == passes {
            break;
        }
        // The members of pass q, and the streamed nodes they need,
        // recomputed here.
        let mut inside = vec![false; n];
        for i in (0..n).rev() {
            let id = NodeId(i as u32);
            let own = mode[i].is_some() && !is_streamed(id) && pass[i] == q;
            if own || inside[i] {
                inside[i] = true;
                for d in graph.operands(id) {
                    if is_streamed(d) {
                        inside[d.index()] = true;
                    }
                }
            }
        }
        let nodes: Vec<(NodeId, Mode)> = (0..n)
            .filter(|i| inside[*i])
            .map(|i| (NodeId(i as u32), mode[i].expect("members have a mode")))
            .collect();
        if nodes.is_empty() {
            continue;
        }
        let pass_streamed: Vec<NodeId> = nodes
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| is_streamed(*id))
            .collect();
        let row_bytes: usize = pass_streamed
            .iter()
            .map(|id| elems[id.index()] / rows * elem_bytes)
            .sum();
        let tile_rows = tile_rows
            .unwrap_or((budget.tile_bytes / row_bytes.max(1)).max(budget.min_tile_rows))
            .clamp(1, rows);
        steps.push(Step::Pass(Pass {
            rows,
            tile_rows,
            nodes,
            streamed: pass_streamed,
        }));
    }
    if streaming == Streaming::Auto {
        let computed = |id: &NodeId| {
            steps
                .iter()
                .filter(|s| matches!(s, Step::Pass(p) if p.streamed.contains(id)))
                .count()
        };
        let recomputes = streamed.iter().any(|id| computed(id) > 1);
        let small = streamed
            .iter()
            .all(|id| elems[id.index()] * elem_bytes < budget.recompute_min_bytes);
        if recomputes && small {
            return whole();
        }
    }
    steps
}
