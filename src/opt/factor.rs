//! Contraction operands become nodes (`factor`).
//!
//! The elaborator inlines functions at the expression level, so a
//! similarity of transformed embeddings (`cos_sim`'s normalised rows,
//! Matryoshka's `normalize_rows(truncate(x, d))`, a weighted dot product)
//! arrives as `sum(k) (x[i, k] / n[i]) * (y[c, k] / m[c])`: a contraction
//! whose factors are not plain reads. GEMM cannot take it, a loop nest
//! computes each factor `I·J` times over, and its gradient with respect to
//! `n` is a sum over `c` *and* `k`, `O(I·J·K)`. `split` takes the body's
//! product apart into the factors over `{b, i, k}` and over `{b, j, k}`,
//! and materialises each one that is not a plain read as its own
//! elementwise node `[(b,) i, k]` placed just before the contraction, whose
//! body becomes `L[(b,) i, k] * R[(b,) j, k]`. Run before differentiation
//! (`optimize`), the gradient then flows through `L` and `R` as two
//! contractions and an `O(I·K)` backward of each factor; the JIT's lowering
//! runs it too, for graphs that did not come through here.
//!
//! Values are the same products regrouped (the rounding of a reassociated
//! product). Only factors that can never fail are materialised — reads at
//! plain index variables, no `if`, no integer division — because a
//! materialised factor is evaluated even where the contraction would not
//! (an empty `j` range).

use super::Report;
use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp};

/// Every contraction with a factor that is not a plain read, split
/// (module doc).
pub fn factor(g: &Graph, report: &mut Report) -> Graph {
    super::insert_before(g, report, "factor", materialise)
}

/// Node `node` of a graph being rebuilt into `out`: when it is a
/// contraction with factors that are not plain reads, pushes them to `out`
/// and reads them in `node`'s body (`true`).
pub fn materialise(out: &mut Graph, node: &mut Node) -> bool {
    let Some((factors, body)) = split(out, node) else {
        return false;
    };
    let mut ids = Vec::new();
    for f in factors {
        out.nodes.push(f);
        ids.push(NodeId(out.nodes.len() as u32 - 1));
    }
    if let NodeKind::Comp(c) = &mut node.kind {
        c.body = body(&ids);
    }
    true
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
pub(super) fn infallible(e: &Expr) -> bool {
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
/// nodes to insert, and the new body given their ids (module doc).
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
