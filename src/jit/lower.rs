//! Lowering before code generation: contraction operands become nodes,
//! reductions on a diagonal become vectors (`Diagonal`), and pair
//! reductions filtered by a rank comparison become a sorted pass
//! (`ranked.rs`).
//!
//! The elaborator inlines functions at the expression level, so a
//! similarity of transformed embeddings (Matryoshka's
//! `normalize_rows(truncate(x, d))`, a weighted dot product) arrives as
//! `sum(k) (x[i, k] / n[i]) * y[c, k]`: a contraction whose factors are not
//! plain reads, which GEMM cannot take and the scalar loop nest computes
//! `I·J` times over. `lower` splits the body's product into the factors over
//! `{b, i, k}` and over `{b, j, k}`, and materialises each one that is not a
//! plain read as its own elementwise node `[(b,) i, k]` placed just before
//! the contraction, whose body becomes `L[(b,) i, k] * R[(b,) j, k]`.
//!
//! Values are the same products regrouped (the rounding of a reassociated
//! product). Only factors that can never fail are materialised — reads at
//! plain index variables, no `if`, no integer division — because a
//! materialised factor is evaluated even where the contraction would not
//! (an empty `j` range). The map from the graph's node ids to the lowered
//! graph's lets the backend report values by the original ids.

use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp};

/// The lowered graph and, for each node of the original, its id there.
pub(super) fn lower(graph: &Graph) -> (Graph, Vec<NodeId>) {
    let mut out = Graph {
        nodes: Vec::with_capacity(graph.nodes.len()),
        ..graph.clone()
    };
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
        if let Some((factors, body)) = split(&out, &node) {
            let mut ids = Vec::new();
            for f in factors {
                out.nodes.push(f);
                ids.push(NodeId(out.nodes.len() as u32 - 1));
            }
            if let NodeKind::Comp(c) = &mut node.kind {
                c.body = body(&ids);
            }
        }
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

/// The factors of a product, flattened.
fn factors(e: &Expr, out: &mut Vec<Expr>) {
    match e {
        Expr::Binary(BinOp::Mul, a, b) => {
            factors(a, out);
            factors(b, out);
        }
        other => out.push(other.clone()),
    }
}

/// Whether evaluating `e` can never fail: reads at index variables or
/// constants only, no `if`, no integer division or remainder.
fn infallible(e: &Expr) -> bool {
    let mut ok = true;
    e.walk(&mut |x| match x {
        Expr::Read { at, .. } => {
            ok &= at
                .iter()
                .all(|i| matches!(i, Expr::Index(_) | Expr::Int(_)))
        }
        Expr::Select(..) => ok = false,
        Expr::Binary(BinOp::Rem | BinOp::FloorDiv, ..) => ok = false,
        _ => {}
    });
    ok
}

/// A plain read of distinct index variables, as GEMM takes it.
fn plain_read(e: &Expr) -> bool {
    match e {
        Expr::Read { at, .. } => {
            let mut seen: Vec<IdxVar> = Vec::new();
            at.iter().all(|i| match i {
                Expr::Index(v) if !seen.contains(v) => {
                    seen.push(*v);
                    true
                }
                _ => false,
            })
        }
        _ => false,
    }
}

type Rebuild = Box<dyn Fn(&[NodeId]) -> Expr>;

/// For a contraction with a factor that is not a plain read: the factor
/// nodes to insert, and the new body given their ids.
fn split(graph: &Graph, node: &Node) -> Option<(Vec<Node>, Rebuild)> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    if node.dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() || r.over.len() != 1 {
        return None;
    }
    let (k, kdim) = r.over[0].clone();
    let (batch, i, j) = match c.indices[..] {
        [i, j] => (None, i, j),
        [b, i, j] => (Some(b), i, j),
        _ => return None,
    };
    let mut fs = Vec::new();
    factors(&c.body, &mut fs);
    if fs.iter().any(|f| f.dtype(graph) != DType::Float) {
        return None;
    }
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for f in fs {
        let vars = f.vars();
        let has_i = vars.contains(&i);
        let has_j = vars.contains(&j);
        if vars
            .iter()
            .any(|v| *v != i && *v != j && *v != k && Some(*v) != batch)
        {
            return None;
        }
        match (has_i, has_j) {
            (true, true) => return None,
            (false, true) => right.push(f),
            _ => left.push(f),
        }
    }
    let product = |fs: &[Expr]| -> Option<Expr> {
        let mut it = fs.iter().cloned();
        let first = it.next()?;
        Some(it.fold(first, |a, b| Expr::binary(BinOp::Mul, a, b)))
    };
    let (l, rgt) = (product(&left)?, product(&right)?);
    let needs = |e: &Expr, outer: IdxVar| {
        // A plain read covering exactly {outer, k} (and the batch) is fine.
        let mut want = vec![outer, k];
        want.extend(batch);
        let mut vars = e.vars();
        vars.sort();
        want.sort();
        !(plain_read(e) && vars == want)
    };
    let (nl, nr) = (needs(&l, i), needs(&rgt, j));
    if !nl && !nr {
        return None;
    }
    if (nl && !infallible(&l)) || (nr && !infallible(&rgt)) {
        return None;
    }
    let dim_of = |v: IdxVar| -> Dim {
        let pos = c
            .indices
            .iter()
            .position(|w| *w == v)
            .expect("an output index");
        node.shape[pos].clone()
    };
    let factor_node = |e: &Expr, outer: IdxVar, name: &str| -> Node {
        let mut indices: Vec<IdxVar> = batch.into_iter().collect();
        indices.extend([outer, k]);
        let mut shape: Vec<Dim> = batch.map(dim_of).into_iter().collect();
        shape.extend([dim_of(outer), kdim.clone()]);
        Node {
            kind: NodeKind::Comp(Comp {
                indices,
                reduce: None,
                body: e.clone(),
            }),
            dtype: DType::Float,
            shape,
            name: Some(format!(
                "{}.{name}",
                node.name.clone().unwrap_or_else(|| "contraction".into())
            )),
            span: node.span,
        }
    };
    let mut new = Vec::new();
    if nl {
        new.push(factor_node(&l, i, "lhs"));
    }
    if nr {
        new.push(factor_node(&rgt, j, "rhs"));
    }
    let read_at = move |id: NodeId, outer: IdxVar| -> Expr {
        let mut at: Vec<Expr> = batch.map(Expr::Index).into_iter().collect();
        at.extend([Expr::Index(outer), Expr::Index(k)]);
        Expr::read(id, at)
    };
    let rebuild: Rebuild = Box::new(move |ids: &[NodeId]| {
        let mut it = ids.iter();
        let a = if nl {
            read_at(*it.next().expect("lhs id"), i)
        } else {
            l.clone()
        };
        let b = if nr {
            read_at(*it.next().expect("rhs id"), j)
        } else {
            rgt.clone()
        };
        Expr::binary(BinOp::Mul, a, b)
    });
    Some((new, rebuild))
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
