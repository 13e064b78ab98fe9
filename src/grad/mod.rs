//! Reverse-mode symbolic differentiation: forward graph → one graph computing
//! the loss and d loss / d every float input.
//!
//! Nodes are visited from the loss backwards. Each node's adjoint is the sum
//! of the contributions its readers made; a comprehension then passes its
//! adjoint to the nodes its body reads:
//!
//! 1. the *seed* at each point of the comprehension's iteration space is the
//!    adjoint times the reduction's weight (1 for sum and plain elements,
//!    1/count for mean, softmax weights for logsumexp, an indicator of the
//!    selected element for max/min, ties to the lowest index);
//! 2. the body is differentiated as a scalar expression (`rules`), giving the
//!    partial for each read `y[e1, .., en]`;
//! 3. each read's contribution is re-indexed over `y`'s own indices (`gather`):
//!    a read at index variables becomes a renaming, a repeated variable (a
//!    diagonal), a data-dependent index (`labels[i]`) or a filter becomes a
//!    mask, and variables the read does not use are summed over. Never a
//!    scatter: every contribution is again a comprehension.
//!
//! Layout nodes have layout adjoints (concat → slices, slice → pad, reshape →
//! reshape). `detach` stops the flow. `grad` never introduces a tensor larger
//! than the largest tensor of the forward graph.

mod gather;
pub mod rules;

use crate::ir::{
    BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp, Reduce, UnOp,
};

/// Appends the gradient program to a copy of `forward` and lists the
/// gradient of every float input in `grads`.
pub fn grad(forward: &Graph) -> Graph {
    let mut g = forward.clone();
    let loss = g.loss();
    let active = active_nodes(&g);
    let n = g.nodes.len();
    let mut contributions: Vec<Vec<NodeId>> = vec![Vec::new(); n];
    let one = push_comp(
        &mut g,
        vec![],
        vec![],
        None,
        Expr::Float(1.0),
        Some("d loss".into()),
    );
    contributions[loss.index()].push(one);
    let mut grads = Vec::new();
    for x in (0..n).rev() {
        let xid = NodeId(x as u32);
        if !active[x] || contributions[x].is_empty() {
            continue;
        }
        let first_new = g.nodes.len();
        let adj = sum_nodes(&mut g, xid, &contributions[x]);
        let node = g.nodes[x].clone();
        match &node.kind {
            NodeKind::Input { name, .. } => grads.push((name.clone(), adj)),
            NodeKind::Comp(c) => comp_adjoint(&mut g, xid, c, adj, &active, &mut contributions),
            NodeKind::Concat { axis, parts } => {
                let mut offset = Dim::lit(0);
                for p in parts {
                    let pshape = g.node(*p).shape.clone();
                    if active[p.index()] {
                        let kind = NodeKind::Slice {
                            src: adj,
                            axis: *axis,
                            start: offset.clone(),
                        };
                        let s = g.push(Node {
                            kind,
                            dtype: DType::Float,
                            shape: pshape.clone(),
                            name: None,
                            span: node.span,
                        });
                        contributions[p.index()].push(s);
                    }
                    offset = offset.add(&pshape[*axis]);
                }
            }
            NodeKind::Slice { src, axis, start } => {
                let c = gather::pad(&mut g, adj, *src, *axis, start, &node.shape[*axis]);
                contributions[src.index()].push(c);
            }
            NodeKind::Reshape { src } => {
                let shape = g.node(*src).shape.clone();
                let r = g.push(Node {
                    kind: NodeKind::Reshape { src: adj },
                    dtype: DType::Float,
                    shape,
                    name: None,
                    span: node.span,
                });
                contributions[src.index()].push(r);
            }
        }
        // Gradient nodes point at the source expression they differentiate.
        for n in &mut g.nodes[first_new..] {
            n.span = n.span.or(node.span);
        }
    }
    // Inputs the loss does not depend on get an explicit zero gradient.
    let inputs: Vec<(NodeId, String, Vec<Dim>)> = g
        .inputs()
        .filter(|i| i.1.dtype == DType::Float)
        .map(|(id, node, name, _)| (id, name.to_string(), node.shape.clone()))
        .collect();
    let mut ordered = Vec::new();
    for (id, name, shape) in inputs {
        let node = match grads.iter().find(|(n, _)| *n == name) {
            Some((_, node)) => *node,
            None => {
                let idx: Vec<IdxVar> = shape.iter().map(|_| g.new_index("p")).collect();
                push_comp(&mut g, idx, shape, None, Expr::Float(0.0), None)
            }
        };
        let _ = id;
        ordered.push((name, node));
    }
    g.grads = ordered;
    g
}

/// Nodes whose value depends on a float input through a path without `detach`.
fn active_nodes(g: &Graph) -> Vec<bool> {
    let mut active = vec![false; g.nodes.len()];
    for (i, node) in g.nodes.iter().enumerate() {
        active[i] = node.dtype == DType::Float
            && match &node.kind {
                NodeKind::Input { .. } => true,
                NodeKind::Comp(c) => differentiable_reads(g, &c.body)
                    .iter()
                    .any(|r| active[r.index()]),
                NodeKind::Concat { parts, .. } => parts.iter().any(|p| active[p.index()]),
                NodeKind::Slice { src, .. } | NodeKind::Reshape { src } => active[src.index()],
            };
    }
    active
}

/// Float nodes read by `e` in value position, outside `detach`.
fn differentiable_reads(g: &Graph, e: &Expr) -> Vec<NodeId> {
    let mut out = Vec::new();
    collect_reads(g, e, &mut out);
    out
}

fn collect_reads(g: &Graph, e: &Expr, out: &mut Vec<NodeId>) {
    match e {
        Expr::Read { node, .. } => {
            if g.node(*node).dtype == DType::Float && !out.contains(node) {
                out.push(*node);
            }
        }
        Expr::Unary(UnOp::Detach | UnOp::ToFloat, _) => {}
        Expr::Unary(_, a) => collect_reads(g, a, out),
        Expr::Binary(op, a, b) => {
            if !(op.is_comparison() || op.is_logical()) {
                collect_reads(g, a, out);
                collect_reads(g, b, out);
            }
        }
        Expr::Select(_, a, b) => {
            collect_reads(g, a, out);
            collect_reads(g, b, out);
        }
        _ => {}
    }
}

pub(crate) fn push_comp(
    g: &mut Graph,
    indices: Vec<IdxVar>,
    shape: Vec<Dim>,
    reduce: Option<Reduce>,
    body: Expr,
    name: Option<String>,
) -> NodeId {
    let dtype = match reduce.as_ref().map(|r| r.op) {
        Some(RedOp::Count) => DType::Int,
        Some(RedOp::Min) | Some(RedOp::Max) if body.dtype(g) == DType::Int => DType::Int,
        _ => DType::Float,
    };
    g.push(Node {
        kind: NodeKind::Comp(Comp {
            indices,
            reduce,
            body,
        }),
        dtype,
        shape,
        name,
        span: None,
    })
}

/// The adjoint of `x`: the elementwise sum of its contributions.
fn sum_nodes(g: &mut Graph, x: NodeId, parts: &[NodeId]) -> NodeId {
    if let [only] = parts {
        return *only;
    }
    let shape = g.node(x).shape.clone();
    let idx: Vec<IdxVar> = shape.iter().map(|_| g.new_index("p")).collect();
    let at: Vec<Expr> = idx.iter().map(|v| Expr::Index(*v)).collect();
    let body = parts
        .iter()
        .map(|p| Expr::read(*p, at.clone()))
        .reduce(|a, b| Expr::binary(BinOp::Add, a, b))
        .unwrap_or(Expr::Float(0.0));
    let name = g.node(x).name.as_ref().map(|n| format!("d {n}"));
    push_comp(g, idx, shape, None, body, name)
}

/// Passes the adjoint of comprehension `x` to the nodes its body reads.
fn comp_adjoint(
    g: &mut Graph,
    x: NodeId,
    c: &Comp,
    adj: NodeId,
    active: &[bool],
    contributions: &mut [Vec<NodeId>],
) {
    let shape = g.node(x).shape.clone();
    let mut vars: Vec<(IdxVar, Dim)> = c
        .indices
        .iter()
        .copied()
        .zip(shape.iter().cloned())
        .collect();
    let here: Vec<Expr> = c.indices.iter().map(|v| Expr::Index(*v)).collect();
    let g_x = Expr::read(adj, here.clone());
    let filter = c.reduce.as_ref().and_then(|r| r.filter.clone());
    let seed = match &c.reduce {
        None => g_x,
        Some(r) => {
            vars.extend(r.over.iter().cloned());
            match r.op {
                RedOp::Sum => g_x,
                // d mean = d sum / (number of elements that passed the filter)
                RedOp::Mean => {
                    let count = push_comp(
                        g,
                        c.indices.clone(),
                        shape.clone(),
                        Some(Reduce {
                            op: RedOp::Count,
                            over: r.over.clone(),
                            filter: r.filter.clone(),
                            empty: 0.0,
                        }),
                        Expr::Int(1),
                        None,
                    );
                    Expr::binary(
                        BinOp::Div,
                        g_x,
                        Expr::unary(UnOp::ToFloat, Expr::read(count, here.clone())),
                    )
                }
                // d logsumexp_r b_r = softmax(b)_r db_r
                RedOp::LogSumExp => {
                    let weight = Expr::unary(
                        UnOp::Exp,
                        Expr::binary(BinOp::Sub, c.body.clone(), Expr::read(x, here.clone())),
                    );
                    Expr::binary(BinOp::Mul, g_x, weight)
                }
                // max/min: all of it to the selected element, the lowest index on ties
                RedOp::Max | RedOp::Min => {
                    let lin = gather::linear_index(&r.over);
                    let hit = Expr::binary(BinOp::Eq, c.body.clone(), Expr::read(x, here.clone()));
                    let sel_filter = match &r.filter {
                        Some(f) => Expr::binary(BinOp::And, f.clone(), hit),
                        None => hit,
                    };
                    let first = push_comp(
                        g,
                        c.indices.clone(),
                        shape.clone(),
                        Some(Reduce {
                            op: RedOp::Min,
                            over: r.over.clone(),
                            filter: Some(sel_filter),
                            empty: f64::INFINITY,
                        }),
                        lin.clone(),
                        None,
                    );
                    let chosen = Expr::binary(BinOp::Eq, lin, Expr::read(first, here.clone()));
                    Expr::Select(Box::new(chosen), Box::new(g_x), Box::new(Expr::Float(0.0)))
                }
                RedOp::Count | RedOp::Any | RedOp::All => return,
            }
        }
    };
    let mut partials: Vec<(NodeId, Vec<Expr>, Expr)> = Vec::new();
    backprop(g, &c.body, seed, active, &mut partials);
    // One contribution per distinct read position: x[i,k]*x[i,k] is one node.
    let mut grouped: Vec<(NodeId, Vec<Expr>, Expr)> = Vec::new();
    for (y, at, p) in partials {
        match grouped
            .iter_mut()
            .find(|(gy, gat, _)| *gy == y && *gat == at)
        {
            Some(entry) => entry.2 = Expr::binary(BinOp::Add, entry.2.clone(), p),
            None => grouped.push((y, at, p)),
        }
    }
    for (y, at, partial) in grouped {
        let node = gather::contribution(g, y, &at, partial, filter.clone(), &vars);
        contributions[y.index()].push(node);
    }
}

/// Differentiates a scalar expression, seeding it with `adj`; records the
/// partial of every differentiable read.
fn backprop(
    g: &Graph,
    e: &Expr,
    adj: Expr,
    active: &[bool],
    out: &mut Vec<(NodeId, Vec<Expr>, Expr)>,
) {
    let live = |x: &Expr| differentiable_reads(g, x).iter().any(|r| active[r.index()]);
    match e {
        Expr::Read { node, at } => {
            if g.node(*node).dtype == DType::Float && active[node.index()] {
                out.push((*node, at.clone(), adj));
            }
        }
        Expr::Unary(op, x) => {
            if live(x) {
                if let Some(gx) = rules::unary(*op, x, e, adj) {
                    backprop(g, x, gx, active, out);
                }
            }
        }
        Expr::Binary(op, a, b) => {
            let (la, lb) = (live(a), live(b));
            if !la && !lb {
                return;
            }
            let (ga, gb) = rules::binary(*op, a, b, e, adj);
            if let (true, Some(ga)) = (la, ga) {
                backprop(g, a, ga, active, out);
            }
            if let (true, Some(gb)) = (lb, gb) {
                backprop(g, b, gb, active, out);
            }
        }
        Expr::Select(c, a, b) => {
            let zero = || Box::new(Expr::Float(0.0));
            if live(a) {
                backprop(
                    g,
                    a,
                    Expr::Select(c.clone(), Box::new(adj.clone()), zero()),
                    active,
                    out,
                );
            }
            if live(b) {
                backprop(
                    g,
                    b,
                    Expr::Select(c.clone(), zero(), Box::new(adj)),
                    active,
                    out,
                );
            }
        }
        _ => {}
    }
}
