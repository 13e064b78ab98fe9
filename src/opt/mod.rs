//! Optimisation passes over the graph IR. Each pass is a named function from
//! graph to graph that keeps every value; the pipeline runs them in order and
//! (in debug builds) the verifier after each.
//!
//! - `simplify`: algebraic rules and constant folding (`rules::SIMPLIFY`);
//! - `stability`: log∘exp, log∘sigmoid, log(1 + exp), and log∘sum∘exp →
//!   logsumexp across nodes;
//! - `cse`: nodes equal up to renaming of index variables are merged;
//! - `inline`: an elementwise node read once, at no amplification, is
//!   substituted into its reader;
//! - `factor`: a contraction's factors that are not plain reads become
//!   nodes of their own (GEMM operands, with an `O(I·K)` gradient each);
//! - `prefix`: contractions of the same rows over several prefix widths
//!   (Matryoshka) become contractions over the blocks between the widths
//!   and running sums, so the widths cost the largest one's work;
//! - `hoist`: factors and `if` conditions free of a sum's reduced indices
//!   are applied once to the sum instead of to every term;
//! - `piecewise`: an elementwise node whose `if`s switch at fixed positions
//!   of its last index (a truncation's gradient) becomes a concat of pieces
//!   with those `if`s decided;
//! - `dce`: nodes no output or gradient needs are dropped, ids renumbered;
//! - `softmax` (gradient programs only, `optimize_gradient`): a logsumexp
//!   whose softmax a later node computes keeps its exponentials in a node of
//!   their own, and the softmax reads them instead of computing them again.

pub mod factor;
pub mod hoist;
pub mod piecewise;
pub mod prefix;
pub mod rules;
pub mod softmax;

use crate::ir::{verify, Comp, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp};
use std::collections::BTreeMap;

/// Which rules and passes fired, for `lossc ir --explain`.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub fired: BTreeMap<&'static str, usize>,
}

impl Report {
    pub fn lines(&self) -> Vec<String> {
        self.fired
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect()
    }
}

/// The standard pipeline.
pub fn optimize(graph: &Graph) -> (Graph, Report) {
    let mut report = Report::default();
    let mut g = graph.clone();
    let passes: &[(&str, fn(&Graph, &mut Report) -> Graph)] = &[
        ("simplify", simplify),
        ("stability", stability),
        ("cse", cse),
        ("inline", inline),
        ("simplify", simplify),
        ("cse", cse),
        ("factor", factor::factor),
        ("prefix", prefix::prefix),
        ("hoist", hoist::hoist),
        ("piecewise", piecewise::piecewise),
        ("cse", cse),
        ("dce", dce),
    ];
    for (name, pass) in passes {
        g = pass(&g, &mut report);
        if cfg!(debug_assertions) {
            if let Err(e) = verify::verify(&g) {
                panic!("internal error: pass `{name}` broke the IR: {e}");
            }
        }
    }
    (g, report)
}

/// The pipeline for a gradient program, which nothing differentiates
/// again: `optimize`, then `softmax` (whose max a gradient would run
/// through).
pub fn optimize_gradient(graph: &Graph) -> (Graph, Report) {
    let (g, mut report) = optimize(graph);
    let g = softmax::softmax(&g, &mut report);
    if cfg!(debug_assertions) {
        if let Err(e) = verify::verify(&g) {
            panic!("internal error: pass `softmax` broke the IR: {e}");
        }
    }
    (g, report)
}

fn map_exprs(g: &Graph, f: &mut impl FnMut(&Expr) -> Expr) -> Graph {
    let mut out = g.without_nodes(g.nodes.len());
    for node in &g.nodes {
        let kind = match &node.kind {
            NodeKind::Comp(c) => NodeKind::Comp(Comp {
                indices: c.indices.clone(),
                reduce: c.reduce.as_ref().map(|r| crate::ir::Reduce {
                    op: r.op,
                    over: r.over.clone(),
                    filter: r
                        .filter
                        .as_ref()
                        .map(|x| f(x))
                        .filter(|x| *x != Expr::Bool(true)),
                    empty: r.empty,
                }),
                body: f(&c.body),
            }),
            other => other.clone(),
        };
        out.nodes.push(Node {
            kind,
            dtype: node.dtype,
            shape: node.shape.clone(),
            name: node.name.clone(),
            span: node.span,
        });
    }
    out
}

pub fn simplify(g: &Graph, report: &mut Report) -> Graph {
    map_exprs(g, &mut |e| {
        rules::rewrite(e, rules::SIMPLIFY, &mut report.fired)
    })
}

pub fn stability(g: &Graph, report: &mut Report) -> Graph {
    let g = map_exprs(g, &mut |e| {
        rules::rewrite(e, rules::STABILITY, &mut report.fired)
    });
    log_sum_exp(&g, report)
}

/// `s[i] = sum(j) exp(b)` read only as `log(s[..])` becomes `logsumexp(j) b`.
fn log_sum_exp(g: &Graph, report: &mut Report) -> Graph {
    let mut out = g.clone();
    for (i, node) in g.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        let NodeKind::Comp(Comp {
            reduce: Some(r),
            body: Expr::Unary(crate::ir::UnOp::Exp, inner),
            indices,
        }) = &node.kind
        else {
            continue;
        };
        if r.op != RedOp::Sum || r.filter.is_some() || is_output(g, id) {
            continue;
        }
        let mut only_under_log = true;
        let mut any = false;
        for other in &g.nodes {
            if let NodeKind::Comp(c) = &other.kind {
                let mut exprs = vec![&c.body];
                if let Some(f) = c.reduce.as_ref().and_then(|r| r.filter.as_ref()) {
                    exprs.push(f);
                }
                for e in exprs {
                    let (under, bare) = count_log_reads(e, id);
                    any |= under > 0;
                    only_under_log &= bare == 0;
                }
            } else if other_reads(other, id) {
                only_under_log = false;
            }
        }
        if !(any && only_under_log) {
            continue;
        }
        let mut reduce = r.clone();
        reduce.op = RedOp::LogSumExp;
        reduce.empty = f64::NEG_INFINITY;
        out.nodes[i].kind = NodeKind::Comp(Comp {
            indices: indices.clone(),
            reduce: Some(reduce),
            body: inner.as_ref().clone(),
        });
        for n in &mut out.nodes {
            if let NodeKind::Comp(c) = &mut n.kind {
                c.body = strip_log(&c.body, id);
                if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
                    *f = strip_log(f, id);
                }
            }
        }
        *report.fired.entry("log-sum-exp").or_insert(0) += 1;
    }
    out
}

fn other_reads(node: &Node, id: NodeId) -> bool {
    match &node.kind {
        NodeKind::Concat { parts, .. } => parts.contains(&id),
        NodeKind::Slice { src, .. } | NodeKind::Reshape { src } => *src == id,
        _ => false,
    }
}

fn is_output(g: &Graph, id: NodeId) -> bool {
    g.outputs.iter().any(|(_, o)| *o == id) || g.grads.iter().any(|(_, o)| *o == id)
}

/// (reads of `id` directly under `log`, other reads of `id`).
fn count_log_reads(e: &Expr, id: NodeId) -> (usize, usize) {
    match e {
        Expr::Unary(crate::ir::UnOp::Log, x) if matches!(x.as_ref(), Expr::Read { node, .. } if *node == id) => {
            (1, 0)
        }
        Expr::Read { node, at } => {
            let inner = at
                .iter()
                .map(|a| count_log_reads(a, id))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
            (inner.0, inner.1 + usize::from(*node == id))
        }
        Expr::Unary(_, a) => count_log_reads(a, id),
        Expr::Binary(_, a, b) => {
            let (x, y) = (count_log_reads(a, id), count_log_reads(b, id));
            (x.0 + y.0, x.1 + y.1)
        }
        Expr::Select(c, a, b) => {
            let (x, y, z) = (
                count_log_reads(c, id),
                count_log_reads(a, id),
                count_log_reads(b, id),
            );
            (x.0 + y.0 + z.0, x.1 + y.1 + z.1)
        }
        _ => (0, 0),
    }
}

fn strip_log(e: &Expr, id: NodeId) -> Expr {
    e.map(&mut |x| match x {
        Expr::Unary(crate::ir::UnOp::Log, inner) if matches!(inner.as_ref(), Expr::Read { node, .. } if *node == id) => *inner,
        other => other,
    })
}

/// What makes two nodes compute the same values: their kind, dtype and
/// shape, with a comprehension's loop variables renumbered in order.
#[derive(PartialEq, Eq, Hash)]
enum NodeKey {
    Input(String),
    Other(String),
    Comp {
        dtype: crate::ir::DType,
        shape: Vec<crate::ir::Dim>,
        reduce: Option<(RedOp, Vec<crate::ir::Dim>, Option<Bitwise>, u64)>,
        body: Bitwise,
    },
}

/// An expression compared and hashed by structure, floats by their bits
/// (so `0.0` and `-0.0` stay apart, as the values they give do).
struct Bitwise(Expr);

impl PartialEq for Bitwise {
    fn eq(&self, other: &Self) -> bool {
        fn same(a: &Expr, b: &Expr) -> bool {
            match (a, b) {
                (Expr::Float(x), Expr::Float(y)) => x.to_bits() == y.to_bits(),
                (Expr::Int(x), Expr::Int(y)) => x == y,
                (Expr::Bool(x), Expr::Bool(y)) => x == y,
                (Expr::Index(x), Expr::Index(y)) => x == y,
                (Expr::Size(x), Expr::Size(y)) => x == y,
                (Expr::Read { node: m, at: a }, Expr::Read { node: n, at: b }) => {
                    m == n && a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
                }
                (Expr::Unary(o, x), Expr::Unary(p, y)) => o == p && same(x, y),
                (Expr::Binary(o, x1, x2), Expr::Binary(p, y1, y2)) => {
                    o == p && same(x1, y1) && same(x2, y2)
                }
                (Expr::Select(c, x1, x2), Expr::Select(d, y1, y2)) => {
                    same(c, d) && same(x1, y1) && same(x2, y2)
                }
                _ => false,
            }
        }
        same(&self.0, &other.0)
    }
}

impl Eq for Bitwise {}

impl std::hash::Hash for Bitwise {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.walk(&mut |e| {
            std::mem::discriminant(e).hash(h);
            match e {
                Expr::Float(x) => x.to_bits().hash(h),
                Expr::Int(x) => x.hash(h),
                Expr::Bool(x) => x.hash(h),
                Expr::Index(x) => x.hash(h),
                Expr::Size(x) => x.hash(h),
                Expr::Read { node, at } => (node, at.len()).hash(h),
                Expr::Unary(o, _) => o.hash(h),
                Expr::Binary(o, ..) => o.hash(h),
                Expr::Select(..) => {}
            }
        });
    }
}

/// `node`'s key: equal for nodes equal up to renaming of index variables.
fn canonical_key(node: &Node) -> NodeKey {
    let NodeKind::Comp(c) = &node.kind else {
        return match &node.kind {
            NodeKind::Input { name, .. } => NodeKey::Input(name.clone()),
            other => NodeKey::Other(format!("{other:?} {:?} {:?}", node.dtype, node.shape)),
        };
    };
    let mut order: Vec<IdxVar> = c.indices.clone();
    if let Some(r) = &c.reduce {
        order.extend(r.over.iter().map(|(v, _)| *v));
    }
    let mut map = BTreeMap::new();
    for (k, v) in order.iter().enumerate() {
        map.insert(*v, Expr::Index(IdxVar(k as u32)));
    }
    let body = Bitwise(c.body.subst(&map));
    let reduce = c.reduce.as_ref().map(|r| {
        let over: Vec<_> = r.over.iter().map(|(_, d)| d.clone()).collect();
        (
            r.op,
            over,
            r.filter.as_ref().map(|f| Bitwise(f.subst(&map))),
            r.empty.to_bits(),
        )
    });
    NodeKey::Comp {
        dtype: node.dtype,
        shape: node.shape.clone(),
        reduce,
        body,
    }
}

pub fn cse(g: &Graph, report: &mut Report) -> Graph {
    let mut out = g.clone();
    let mut seen: rustc_hash::FxHashMap<NodeKey, NodeId> = Default::default();
    let mut map: Vec<NodeId> = (0..g.nodes.len() as u32).map(NodeId).collect();
    for i in 0..out.nodes.len() {
        out.nodes[i].remap(&map);
        let key = canonical_key(&out.nodes[i]);
        match seen.get(&key) {
            Some(first) => {
                map[i] = *first;
                *report.fired.entry("cse").or_insert(0) += 1;
                if out.nodes[first.index()].name.is_none() {
                    out.nodes[first.index()].name = out.nodes[i].name.clone();
                }
            }
            None => {
                seen.insert(key, NodeId(i as u32));
            }
        }
    }
    for (_, id) in out.outputs.iter_mut().chain(out.grads.iter_mut()) {
        *id = map[id.index()];
    }
    dce_owned(out, &mut Report::default())
}

/// How many times each node is read (by any node), and where.
fn readers(g: &Graph) -> Vec<Vec<NodeId>> {
    let mut out = vec![Vec::new(); g.nodes.len()];
    for i in 0..g.nodes.len() {
        for op in g.operands(NodeId(i as u32)) {
            out[op.index()].push(NodeId(i as u32));
        }
    }
    out
}

fn count_reads(e: &Expr, id: NodeId) -> usize {
    let mut n = 0;
    e.walk(&mut |x| {
        if matches!(x, Expr::Read { node, .. } if *node == id) {
            n += 1;
        }
    });
    n
}

/// Substitutes an elementwise node (no reduction) that is read exactly once,
/// by a comprehension whose iteration space is no larger than the node's
/// shape (so inlining never multiplies work).
pub fn inline(g: &Graph, report: &mut Report) -> Graph {
    let mut out = g.clone();
    let rd = readers(g);
    for i in 0..g.nodes.len() {
        let id = NodeId(i as u32);
        let NodeKind::Comp(Comp {
            reduce: None,
            body,
            indices,
        }) = out.nodes[i].kind.clone()
        else {
            continue;
        };
        if is_output(&out, id) || rd[i].len() != 1 {
            continue;
        }
        let consumer = rd[i][0].index();
        let NodeKind::Comp(c) = &out.nodes[consumer].kind else {
            continue;
        };
        let filter_reads = c
            .reduce
            .as_ref()
            .and_then(|r| r.filter.as_ref())
            .map_or(0, |f| count_reads(f, id));
        let space = c.indices.len() + c.reduce.as_ref().map_or(0, |r| r.over.len());
        if count_reads(&c.body, id) != 1 || filter_reads != 0 || space > indices.len() {
            continue;
        }
        let new_body = c.body.map(&mut |x| match x {
            Expr::Read { node, at } if node == id => {
                let map: BTreeMap<IdxVar, Expr> = indices.iter().copied().zip(at).collect();
                body.subst(&map)
            }
            other => other,
        });
        if let NodeKind::Comp(c) = &mut out.nodes[consumer].kind {
            c.body = new_body;
        }
        *report.fired.entry("inline").or_insert(0) += 1;
    }
    dce_owned(out, &mut Report::default())
}

/// Rebuilds `g` node by node, letting `rewrite` push new nodes before each
/// one (into the graph built so far) and change it; counts the rewrites
/// under `rule`. References are renumbered.
fn insert_before(
    g: &Graph,
    report: &mut Report,
    rule: &'static str,
    mut rewrite: impl FnMut(&mut Graph, &mut Node) -> bool,
) -> Graph {
    let mut out = g.without_nodes(g.nodes.len());
    let mut map: Vec<NodeId> = Vec::with_capacity(g.nodes.len());
    for node in &g.nodes {
        let mut node = node.clone();
        node.remap(&map);
        if rewrite(&mut out, &mut node) {
            *report.fired.entry(rule).or_insert(0) += 1;
        }
        out.nodes.push(node);
        map.push(NodeId(out.nodes.len() as u32 - 1));
    }
    for (_, id) in out.outputs.iter_mut().chain(out.grads.iter_mut()) {
        *id = map[id.index()];
    }
    out
}

/// Drops nodes that no output or gradient needs; inputs always stay.
pub fn dce(g: &Graph, report: &mut Report) -> Graph {
    let live = live_nodes(g);
    let nodes = g.nodes.iter().enumerate().filter(|(i, _)| live[*i]);
    keep_live(
        g.without_nodes(g.nodes.len()),
        nodes.map(|(i, n)| (i, n.clone())),
        &live,
        report,
    )
}

/// `dce` of a graph that is not needed afterwards: its nodes move.
fn dce_owned(mut g: Graph, report: &mut Report) -> Graph {
    let live = live_nodes(&g);
    let nodes = std::mem::take(&mut g.nodes);
    let nodes = nodes.into_iter().enumerate().filter(|(i, _)| live[*i]);
    keep_live(g, nodes, &live, report)
}

/// Which nodes an output, a gradient or an input needs.
fn live_nodes(g: &Graph) -> Vec<bool> {
    let mut live = vec![false; g.nodes.len()];
    let mut stack: Vec<NodeId> = g
        .outputs
        .iter()
        .chain(g.grads.iter())
        .map(|(_, id)| *id)
        .collect();
    for (id, ..) in g.inputs() {
        stack.push(id);
    }
    while let Some(id) = stack.pop() {
        if live[id.index()] {
            continue;
        }
        live[id.index()] = true;
        stack.extend(g.operands(id));
    }
    live
}

/// `out` (a graph without nodes) with the live `nodes` (each with its index
/// in the graph they came from), renumbered.
fn keep_live(
    mut out: Graph,
    nodes: impl Iterator<Item = (usize, Node)>,
    live: &[bool],
    report: &mut Report,
) -> Graph {
    let dead = live.iter().filter(|l| !**l).count();
    if dead > 0 {
        *report.fired.entry("dce").or_insert(0) += dead;
    }
    let mut map = vec![NodeId(u32::MAX); live.len()];
    for (i, mut n) in nodes {
        n.remap(&map);
        map[i] = out.push(n);
    }
    for (_, id) in out.outputs.iter_mut().chain(out.grads.iter_mut()) {
        *id = map[id.index()];
    }
    out
}
