//! Re-indexing a read's partial over the indices of the node it reads.
//!
//! A comprehension over variables V reads `y[e_1, .., e_n]`. Its contribution
//! to the adjoint of `y` at a point p is the sum, over the points of V where
//! `e_k = p_k` for every k, of the partial. We solve those equations instead of
//! scattering: a plain variable `e_k = v` is renamed to `p_k`; `v + c` is
//! shifted (`v = p_k - c`, with a range guard); anything else (a repeated
//! variable, `labels[i]`, `c % B`) becomes a condition `e_k == p_k`. Variables
//! left unsolved are summed over, under the conditions as a filter. The
//! result is one comprehension over `y`'s shape.

use super::push_comp;
use crate::ir::{BinOp, Dim, Expr, Graph, IdxVar, NodeId, RedOp, Reduce};
use std::collections::BTreeMap;

pub(super) fn contribution(
    g: &mut Graph,
    y: NodeId,
    at: &[Expr],
    partial: Expr,
    filter: Option<Expr>,
    vars: &[(IdxVar, Dim)],
) -> NodeId {
    let y_shape = g.node(y).shape.clone();
    let extent = |v: IdxVar| vars.iter().find(|(w, _)| *w == v).map(|(_, d)| d.clone());
    let p: Vec<IdxVar> = at
        .iter()
        .map(|e| {
            let name = match e {
                Expr::Index(v) => g.index_name(*v).to_string(),
                _ => "p".to_string(),
            };
            g.new_index(&name)
        })
        .collect();
    let mut subst: BTreeMap<IdxVar, Expr> = BTreeMap::new();
    let mut conds: Vec<Expr> = Vec::new();
    let mut solved = vec![false; at.len()];
    // Pass 1: plain variables are renamed.
    for (k, e) in at.iter().enumerate() {
        if let Expr::Index(v) = e {
            if let (false, Some(ext)) = (subst.contains_key(v), extent(*v)) {
                subst.insert(*v, Expr::Index(p[k]));
                if ext != y_shape[k] {
                    conds.push(lt(Expr::Index(p[k]), Expr::dim(&ext)));
                }
                solved[k] = true;
            }
        }
    }
    // Pass 2: `v + c` / `v - c` are shifted.
    for (k, e) in at.iter().enumerate() {
        if solved[k] {
            continue;
        }
        if let Some((v, offset)) = shifted_var(e) {
            if let (false, Some(ext)) = (subst.contains_key(&v), extent(v)) {
                let back = Expr::binary(BinOp::Sub, Expr::Index(p[k]), offset.clone());
                conds.push(Expr::binary(BinOp::Ge, back.clone(), Expr::Int(0)));
                conds.push(lt(back.clone(), Expr::dim(&ext)));
                subst.insert(v, back);
                solved[k] = true;
            }
        }
    }
    // Pass 3: everything else is a condition.
    for (k, e) in at.iter().enumerate() {
        if !solved[k] {
            conds.push(Expr::binary(BinOp::Eq, e.subst(&subst), Expr::Index(p[k])));
        }
    }
    if let Some(f) = filter {
        conds.insert(0, f.subst(&subst));
    }
    let cond = conds
        .into_iter()
        .reduce(|a, b| Expr::binary(BinOp::And, a, b));
    let body = partial.subst(&subst);
    let unsolved: Vec<(IdxVar, Dim)> = vars
        .iter()
        .filter(|(v, _)| !subst.contains_key(v))
        .cloned()
        .collect();
    if unsolved.is_empty() {
        let body = match cond {
            Some(c) => Expr::Select(Box::new(c), Box::new(body), Box::new(Expr::Float(0.0))),
            None => body,
        };
        push_comp(g, p, y_shape, None, body, None)
    } else {
        let reduce = Reduce {
            op: RedOp::Sum,
            over: unsolved,
            filter: cond,
            empty: 0.0,
        };
        push_comp(g, p, y_shape, Some(reduce), body, None)
    }
}

fn lt(a: Expr, b: Expr) -> Expr {
    Expr::binary(BinOp::Lt, a, b)
}

/// `v + c`, `c + v`, `v - c` with `c` free of index variables: `(v, c)` (or `-c`).
fn shifted_var(e: &Expr) -> Option<(IdxVar, Expr)> {
    let constant = |x: &Expr| x.vars().is_empty();
    match e {
        Expr::Binary(BinOp::Add, a, b) => match (a.as_ref(), b.as_ref()) {
            (Expr::Index(v), c) | (c, Expr::Index(v)) if constant(c) => Some((*v, c.clone())),
            _ => None,
        },
        Expr::Binary(BinOp::Sub, a, c) => match a.as_ref() {
            Expr::Index(v) if constant(c) => Some((
                *v,
                Expr::binary(BinOp::Sub, Expr::Int(0), c.as_ref().clone()),
            )),
            _ => None,
        },
        _ => None,
    }
}

/// The adjoint of a slice: the slice's adjoint placed at its offset, zero elsewhere.
pub(super) fn pad(
    g: &mut Graph,
    adj: NodeId,
    src: NodeId,
    axis: usize,
    start: &Dim,
    len: &Dim,
) -> NodeId {
    let shape = g.node(src).shape.clone();
    let p: Vec<IdxVar> = shape.iter().map(|_| g.new_index("p")).collect();
    let mut at: Vec<Expr> = p.iter().map(|v| Expr::Index(*v)).collect();
    let back = Expr::binary(BinOp::Sub, Expr::Index(p[axis]), Expr::dim(start));
    at[axis] = back.clone();
    let inside = Expr::binary(
        BinOp::And,
        Expr::binary(BinOp::Ge, back.clone(), Expr::Int(0)),
        lt(back, Expr::dim(len)),
    );
    let body = Expr::Select(
        Box::new(inside),
        Box::new(Expr::read(adj, at)),
        Box::new(Expr::Float(0.0)),
    );
    push_comp(g, p, shape, None, body, None)
}

/// `r1 * n2 * n3 + r2 * n3 + r3`: the row-major position of a reduction point,
/// so that "the lowest index" is well defined for several reduced variables.
pub(super) fn linear_index(over: &[(IdxVar, Dim)]) -> Expr {
    let mut acc: Option<Expr> = None;
    for (v, d) in over {
        acc = Some(match acc {
            None => Expr::Index(*v),
            Some(a) => Expr::binary(
                BinOp::Add,
                Expr::binary(BinOp::Mul, a, Expr::dim(d)),
                Expr::Index(*v),
            ),
        });
    }
    acc.unwrap_or(Expr::Int(0))
}
