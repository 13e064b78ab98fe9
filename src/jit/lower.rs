//! Lowering before code generation: contraction operands become nodes,
//! reductions on a diagonal become vectors (`Diagonal`), and pair
//! reductions filtered by a rank comparison become a sorted pass
//! (`ranked.rs`).
//!
//! Contraction operands are materialised as in `opt::factor` (for graphs
//! that did not come through `opt::optimize`). The map from the graph's node ids to the lowered
//! graph's lets the backend report values by the original ids.

use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind};

/// The lowered graph and, for each node of the original, its id there.
pub(super) fn lower(graph: &Graph) -> (Graph, Vec<NodeId>) {
    let mut out = graph.without_nodes(graph.nodes.len());
    let mut map: Vec<NodeId> = Vec::with_capacity(graph.nodes.len());
    let mut diagonals: Vec<Diagonal> = Vec::new();
    // For each node of `out` whose diagonal some node reads, its vector.
    let mut diagonal_of: std::collections::BTreeMap<NodeId, NodeId> = Default::default();
    for node in &graph.nodes {
        let mut node = node.clone();
        node.remap(&map);
        read_diagonals(&mut node, &diagonals);
        read_matrix_diagonals(&mut out, &mut node, &mut diagonal_of);
        let vector = NodeId(out.nodes.len() as u32);
        if let Some((d, whole, mut diag)) = diagonal(&node, vector) {
            out.nodes.push(d);
            out.nodes.push(whole);
            diag.node = NodeId(out.nodes.len() as u32 - 1);
            map.push(diag.node);
            diagonals.push(diag);
            continue;
        }
        if let Some((helpers, rewritten)) = super::ranked::rewrite(&mut out, &node) {
            out.nodes.extend(helpers);
            out.nodes.push(rewritten);
            map.push(NodeId(out.nodes.len() as u32 - 1));
            continue;
        }
        crate::opt::factor::materialise(&mut out, &mut node);
        out.nodes.push(node);
        map.push(NodeId(out.nodes.len() as u32 - 1));
    }
    for (_, id) in out.outputs.iter_mut().chain(out.grads.iter_mut()) {
        *id = map[id.index()];
    }
    (out, map)
}

/// A reduction over a diagonal, `out[j, j2] = sum(i | j == j2) x[i, j]`
/// (the gradient of a diagonal read, `g[j, j]`): the filter compares two
/// output indices, so every element off the diagonal is the empty value,
/// yet the loop nest visits all `N·N` of them (and a streaming pass every
/// one per block). Lowered to the reduction on the diagonal alone,
/// `d[j] = sum(i) x[i, j]`, one element per `j`, then the node itself as
/// `if j == j2 then d[j] else empty`, and every later read `out[a, b]` as
/// `if a == b then d[a] else empty` (so the node is computed only where a
/// run keeps it). The same elements are reduced in the same order, and only
/// on the diagonal, as the interpreter's filter lets through.
struct Diagonal {
    /// The lowered node (the whole matrix) and the vector on its diagonal.
    node: NodeId,
    vector: NodeId,
    /// The positions of the two compared indices (the second one dropped),
    /// and the node's shape.
    keep: usize,
    drop: usize,
    shape: Vec<Dim>,
    empty: f64,
}

/// For a float reduction whose filter is exactly `a == b` of two output
/// indices of one dim: their positions, and the empty value.
fn diagonal_filter(c: &Comp) -> Option<(usize, usize, f64)> {
    let r = c.reduce.as_ref()?;
    let Some(Expr::Binary(BinOp::Eq, a, b)) = &r.filter else {
        return None;
    };
    let (Expr::Index(a), Expr::Index(b)) = (a.as_ref(), b.as_ref()) else {
        return None;
    };
    let pa = c.indices.iter().position(|v| v == a)?;
    let pb = c.indices.iter().position(|v| v == b)?;
    (pa != pb).then_some((pa.min(pb), pa.max(pb), r.empty))
}

/// The vector on the diagonal (to get id `vector`), the node rebuilt from
/// it, and their `Diagonal` (its `node` set by the caller).
fn diagonal(node: &Node, vector: NodeId) -> Option<(Node, Node, Diagonal)> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    if node.dtype != DType::Float {
        return None;
    }
    let (keep, drop, empty) = diagonal_filter(c)?;
    if node.shape[keep] != node.shape[drop] {
        return None;
    }
    let (a, b) = (c.indices[keep], c.indices[drop]);
    let rename = std::collections::BTreeMap::from([(b, Expr::Index(a))]);
    let mut indices = c.indices.clone();
    indices.remove(drop);
    let mut shape = node.shape.clone();
    shape.remove(drop);
    let mut reduce = c.reduce.clone()?;
    reduce.filter = None;
    let on_diagonal = Node {
        kind: NodeKind::Comp(Comp {
            indices: indices.clone(),
            reduce: Some(reduce),
            body: c.body.subst(&rename),
        }),
        dtype: DType::Float,
        shape,
        name: Some(format!(
            "{}.diagonal",
            node.name.clone().unwrap_or_else(|| "reduction".into())
        )),
        span: node.span,
    };
    let whole = Node {
        kind: NodeKind::Comp(Comp {
            indices: c.indices.clone(),
            reduce: None,
            body: Expr::Select(
                Box::new(Expr::binary(BinOp::Eq, Expr::Index(a), Expr::Index(b))),
                Box::new(Expr::read(
                    vector,
                    indices.iter().map(|v| Expr::Index(*v)).collect(),
                )),
                Box::new(Expr::Float(empty)),
            ),
        }),
        ..node.clone()
    };
    let diag = Diagonal {
        node: NodeId(u32::MAX),
        vector,
        keep,
        drop,
        shape: node.shape.clone(),
        empty,
    };
    Some((on_diagonal, whole, diag))
}

/// Reads of a lowered diagonal node become `if a == b then d[a] else
/// empty`, where every index is a loop variable whose extent is the dim it
/// reads (so the original read could not fail either).
fn read_diagonals(node: &mut Node, diagonals: &[Diagonal]) {
    if diagonals.is_empty() {
        return;
    }
    let NodeKind::Comp(c) = &mut node.kind else {
        return;
    };
    let extents = c.levels(&node.shape);
    let in_range = |at: &[Expr], shape: &[Dim]| {
        at.len() == shape.len()
            && at.iter().zip(shape).all(|(e, dim)| match e {
                Expr::Index(v) => extents.iter().any(|(w, d)| w == v && d == dim),
                _ => false,
            })
    };
    let re = |e: &Expr| {
        e.map(&mut |x| match x {
            Expr::Read { node, at } => match diagonals
                .iter()
                .find(|d| d.node == node && in_range(&at, &d.shape))
            {
                Some(d) => {
                    let mut kept = at.clone();
                    kept.remove(d.drop);
                    Expr::Select(
                        Box::new(Expr::binary(
                            BinOp::Eq,
                            at[d.keep].clone(),
                            at[d.drop].clone(),
                        )),
                        Box::new(Expr::read(d.vector, kept)),
                        Box::new(Expr::Float(d.empty)),
                    )
                }
                None => Expr::Read { node, at },
            },
            other => other,
        })
    };
    c.body = re(&c.body);
    if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
        *f = re(f);
    }
}

/// Reads `x[v, v]` of a square node's diagonal (`sq[i, j] = g[j, j] -
/// 2 g[i, j] + g[i, i]`, distances from a Gram matrix), where `v` is a loop
/// variable whose extent is the dim it reads, become reads `x.diag[v]` of a
/// vector `x.diag[a] = x[a, a]` pushed to `out` before the first such
/// reader: a loop over `j` reads the diagonal contiguously, in lanes,
/// instead of one element `N + 1` apart per step. Values are the same
/// elements.
fn read_matrix_diagonals(
    out: &mut Graph,
    node: &mut Node,
    diagonal_of: &mut std::collections::BTreeMap<NodeId, NodeId>,
) {
    let NodeKind::Comp(c) = &mut node.kind else {
        return;
    };
    let extents = c.levels(&node.shape);
    let on_diagonal = |nodes: &[Node], at: &[Expr], x: NodeId| -> Option<IdxVar> {
        let [dim, cols] = &nodes[x.index()].shape[..] else {
            return None;
        };
        match at {
            [Expr::Index(a), Expr::Index(b)]
                if a == b && dim == cols && extents.iter().any(|(w, d)| w == a && d == dim) =>
            {
                Some(*a)
            }
            _ => None,
        }
    };
    let mut wanted: Vec<NodeId> = Vec::new();
    let mut find = |e: &Expr| {
        e.walk(&mut |x| {
            if let Expr::Read { node, at } = x {
                if on_diagonal(&out.nodes, at, *node).is_some() && !wanted.contains(node) {
                    wanted.push(*node);
                }
            }
        })
    };
    find(&c.body);
    if let Some(f) = c.reduce.as_ref().and_then(|r| r.filter.as_ref()) {
        find(f);
    }
    for x in wanted {
        if diagonal_of.contains_key(&x) {
            continue;
        }
        let a = out.new_index("a");
        let source = &out.nodes[x.index()];
        let vector = Node {
            kind: NodeKind::Comp(Comp {
                indices: vec![a],
                reduce: None,
                body: Expr::read(x, vec![Expr::Index(a), Expr::Index(a)]),
            }),
            dtype: source.dtype,
            shape: vec![source.shape[0].clone()],
            name: Some(format!(
                "{}.diag",
                source
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("%{}", x.index()))
            )),
            span: source.span,
        };
        out.nodes.push(vector);
        diagonal_of.insert(x, NodeId(out.nodes.len() as u32 - 1));
    }
    let re = |e: &Expr| {
        e.map(&mut |x| match x {
            Expr::Read { node, at } => {
                match (on_diagonal(&out.nodes, &at, node), diagonal_of.get(&node)) {
                    (Some(v), Some(d)) => Expr::read(*d, vec![Expr::Index(v)]),
                    _ => Expr::Read { node, at },
                }
            }
            other => other,
        })
    };
    c.body = re(&c.body);
    if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
        *f = re(f);
    }
}

/// The ids of the original graph's nodes that the lowered graph `lowered`
/// (with `map`) computes as contractions.
pub(super) fn original_ids(map: &[NodeId], lowered: &[NodeId]) -> Vec<NodeId> {
    map.iter()
        .enumerate()
        .filter(|(_, l)| lowered.contains(l))
        .map(|(i, _)| NodeId(i as u32))
        .collect()
}
