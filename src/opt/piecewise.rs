//! Elementwise nodes whose terms switch on at fixed positions of the last
//! index run as pieces (`piecewise`).
//!
//! The gradient of a truncation reads `if k < d then g[.., k] else 0`; a
//! Matryoshka loss sums one such term (or two) per width, and the blocks of
//! `prefix` add `if k - o >= 0 and k - o < w then q[.., k - o] else 0`:
//!
//! ```text
//! d anchor[p, k] = (if k < 96 then a[p, k] else 0) + (if k < 192 then b[p, k] else 0) + ...
//! ```
//!
//! Every element evaluates every term and its condition, and the branches
//! keep the loop from running in vector lanes. The conditions only change
//! value at a few positions of `k`, the *breakpoints*; between two of them
//! each is a constant. So the node becomes a concat, along its last axis, of
//! one node per piece `[lo, hi)` over `k' = k - lo`, whose body has every
//! such condition replaced by its value (and is then simplified, dropping
//! the terms that are off):
//!
//! ```text
//! piece 0 [p, k] = a[p, k] + b[p, k] + ...         # k in 0..96
//! piece 1 [p, k] = b[p, k + 96] + ...               # k in 96..192
//! ```
//!
//! A condition is decided when it compares `±k + c` (after moving every term
//! to one side) with a constant: `k - 384 >= 0`, `k < 96`. The last piece
//! runs from the last breakpoint to the extent, which may be symbolic (and
//! then empty at run time). Values are unchanged: each element evaluates the
//! same terms as before, minus the ones that were `0`.

use super::Report;
use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeKind};
use std::collections::BTreeMap;

/// Every elementwise node with breakpoints in its last index, as pieces
/// (module doc).
pub fn piecewise(g: &Graph, report: &mut Report) -> Graph {
    let least = least_sizes(g);
    super::insert_before(g, report, "piecewise", |out, node| {
        let Some(pieces) = pieces(out, node, &least) else {
            return false;
        };
        let mut ids = Vec::new();
        for p in pieces {
            ids.push(out.push(p));
        }
        node.kind = NodeKind::Concat {
            axis: node.shape.len() - 1,
            parts: ids,
        };
        true
    })
}

/// The least value each symbolic dim can have in a run that does not fail:
/// a read `x[.., k, ..]` evaluated at every point of its node (not under an
/// `if` branch or the right of `and`/`or`), with `k` over a literal extent
/// `n`, fails unless that dim of `x` is at least `n` (the truncations of a
/// Matryoshka loss read `x[b, t]` for `t < d`).
fn least_sizes(g: &Graph) -> BTreeMap<Dim, i64> {
    fn visit(g: &Graph, e: &Expr, extents: &BTreeMap<IdxVar, i64>, least: &mut BTreeMap<Dim, i64>) {
        match e {
            Expr::Read { node, at } => {
                for (dim, ix) in g.node(*node).shape.iter().zip(at) {
                    if let (Expr::Index(v), None) = (ix, dim.as_lit()) {
                        if let Some(n) = extents.get(v) {
                            let l = least.entry(dim.clone()).or_insert(0);
                            *l = (*l).max(*n);
                        }
                    }
                    visit(g, ix, extents, least);
                }
            }
            Expr::Unary(_, a) => visit(g, a, extents, least),
            Expr::Binary(BinOp::And | BinOp::Or, a, _) => visit(g, a, extents, least),
            Expr::Binary(_, a, b) => {
                visit(g, a, extents, least);
                visit(g, b, extents, least);
            }
            Expr::Select(c, ..) => visit(g, c, extents, least),
            _ => {}
        }
    }
    let mut least = BTreeMap::new();
    for node in &g.nodes {
        let NodeKind::Comp(c) = &node.kind else {
            continue;
        };
        let extents: BTreeMap<IdxVar, i64> = c
            .levels(&node.shape)
            .into_iter()
            .filter_map(|(v, d)| Some((v, d.as_lit()?)))
            .collect();
        visit(g, &c.body, &extents, &mut least);
        if let Some(f) = c.reduce.as_ref().and_then(|r| r.filter.as_ref()) {
            visit(g, f, &extents, &mut least);
        }
    }
    least
}

/// `e` as `a * k + c` with `a` in {-1, 0, 1}, for ints built from `k`,
/// literals, `+` and `-`.
fn affine(e: &Expr, k: IdxVar) -> Option<(i64, i64)> {
    match e {
        Expr::Index(v) if *v == k => Some((1, 0)),
        Expr::Int(n) => Some((0, *n)),
        Expr::Binary(op @ (BinOp::Add | BinOp::Sub), a, b) => {
            let (a1, c1) = affine(a, k)?;
            let (a2, c2) = affine(b, k)?;
            let (a, c) = match op {
                BinOp::Add => (a1 + a2, c1.checked_add(c2)?),
                _ => (a1 - a2, c1.checked_sub(c2)?),
            };
            (a.abs() <= 1).then_some((a, c))
        }
        _ => None,
    }
}

/// An index `k + c` as written once: `k + 96 - 96` is `k`.
fn canonical(e: Expr, k: IdxVar) -> Expr {
    match affine(&e, k) {
        Some((1, 0)) => Expr::Index(k),
        Some((1, c)) if c > 0 => Expr::binary(BinOp::Add, Expr::Index(k), Expr::Int(c)),
        Some((1, c)) => Expr::binary(BinOp::Sub, Expr::Index(k), Expr::Int(-c)),
        _ => e,
    }
}

/// A comparison `lhs op rhs` as `a * k + c op 0` with `a = ±1`.
fn comparison(e: &Expr, k: IdxVar) -> Option<(BinOp, i64, i64)> {
    let Expr::Binary(op @ (BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge), l, r) = e else {
        return None;
    };
    let (a, c) = affine(
        &Expr::binary(BinOp::Sub, l.as_ref().clone(), r.as_ref().clone()),
        k,
    )?;
    (a != 0).then_some((*op, a, c))
}

/// The first `k` at which `a * k + c op 0` changes value.
fn breakpoint(op: BinOp, a: i64, c: i64) -> i64 {
    // a = 1: k + c < 0 iff k < -c; a = -1: -k + c < 0 iff k > c.
    match (a, op) {
        (1, BinOp::Lt | BinOp::Ge) => -c,
        (1, _) => -c + 1,
        (_, BinOp::Gt | BinOp::Le) => c,
        _ => c + 1,
    }
}

fn holds(op: BinOp, v: i64) -> bool {
    match op {
        BinOp::Lt => v < 0,
        BinOp::Le => v <= 0,
        BinOp::Gt => v > 0,
        _ => v >= 0,
    }
}

/// The pieces of `node`, or `None` when it has fewer than two `if`s decided
/// by breakpoints inside its last extent, or its extent is symbolic and not
/// known to reach the last breakpoint.
fn pieces(out: &mut Graph, node: &Node, least: &BTreeMap<Dim, i64>) -> Option<Vec<Node>> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    if c.reduce.is_some() || node.dtype != DType::Float || c.indices.is_empty() {
        return None;
    }
    let rank = c.indices.len();
    let k = c.indices[rank - 1];
    let extent = node.shape[rank - 1].clone();
    let mut points = Vec::new();
    let mut decided = 0;
    c.body.walk(&mut |e| {
        if let Expr::Select(cond, ..) = e {
            let mut any = false;
            cond.walk(&mut |x| {
                if let Some((op, a, c)) = comparison(x, k) {
                    points.push(breakpoint(op, a, c));
                    any = true;
                }
            });
            decided += usize::from(any);
        }
    });
    let inside = |p: i64| p > 0 && extent.as_lit().is_none_or(|n| p < n);
    points.retain(|p| inside(*p));
    points.sort_unstable();
    points.dedup();
    if points.is_empty() || decided < 2 {
        return None;
    }
    // A symbolic extent must reach the last breakpoint in every run that
    // gets here, or a piece would not fit (`least_sizes`).
    let last = *points.last()?;
    if extent.as_lit().is_none() && least.get(&extent).is_none_or(|l| *l < last) {
        return None;
    }
    let mut bounds = vec![0];
    bounds.extend(points);
    let mut pieces = Vec::new();
    for (n, &lo) in bounds.iter().enumerate() {
        let width = match bounds.get(n + 1) {
            Some(hi) => Dim::lit(hi - lo),
            None => extent.sub(&Dim::lit(lo)),
        };
        // Decide every comparison at the piece's first position, then
        // shift `k` to the piece.
        let body = c.body.map(&mut |e| match comparison(&e, k) {
            Some((op, a, c)) => Expr::Bool(holds(op, a * lo + c)),
            None => e,
        });
        // Fresh index variables, the last one shifted to the piece.
        let indices: Vec<IdxVar> = c
            .indices
            .iter()
            .map(|v| {
                let name = out.index_names[v.0 as usize].clone();
                out.new_index(&name)
            })
            .collect();
        let mut rename: BTreeMap<IdxVar, Expr> = c
            .indices
            .iter()
            .zip(&indices)
            .map(|(v, w)| (*v, Expr::Index(*w)))
            .collect();
        if lo != 0 {
            let shifted = Expr::binary(BinOp::Add, Expr::Index(indices[rank - 1]), Expr::Int(lo));
            rename.insert(k, shifted);
        }
        let last = indices[rank - 1];
        let body = body.subst(&rename).map(&mut |e| match e {
            Expr::Read { node, at } => Expr::Read {
                node,
                at: at.into_iter().map(|i| canonical(i, last)).collect(),
            },
            other => other,
        });
        let body = super::rules::rewrite(&body, super::rules::SIMPLIFY, &mut BTreeMap::new());
        let mut shape = node.shape.clone();
        shape[rank - 1] = width;
        pieces.push(Node {
            kind: NodeKind::Comp(Comp {
                indices,
                reduce: None,
                body,
            }),
            dtype: node.dtype,
            shape,
            name: node.name.as_ref().map(|n| format!("{n}.piece")),
            span: node.span,
        });
    }
    Some(pieces)
}
