//! Contractions over prefixes of the same rows share their work (`prefix`).
//!
//! Matryoshka losses score every embedding truncated to several widths:
//! after `factor`, each width `d` is a contraction
//!
//! ```text
//! S_d[i, c] = sum(k: d) L_d[i, k] * R_d[c, k]
//! ```
//!
//! whose operands are the *same* rows, truncated and scaled per row: the
//! normalisations `x[i, k] / n_d[i]` (chains of them, and concats and
//! reshapes of such rows, as MNRL's `concat(positive, flatten(negative))`).
//! Computed as written, the widths cost `sum(d) d` of GEMM work, 1.875× the
//! full width for Matryoshka's `D, D/2, D/4, D/8`. With the scales factored
//! out, `S_d[i, c] = l_d[i] * r_d[c] * P_d[i, c]`, where `P_d` is the
//! contraction of the unscaled rows over their first `d` entries; and
//! `P_d` is a running sum of contractions over the *blocks* between
//! successive widths:
//!
//! ```text
//! Q_j[i, c] = sum(k: w_j - w_(j-1)) baseL[i, w_(j-1) + k] * baseR[c, w_(j-1) + k]
//! P_(w_j) = P_(w_(j-1)) + Q_j
//! ```
//!
//! The blocks cost the largest width once. The gradient follows the same
//! shape: `d Q_j` is a running sum of the `d P_d`, and each block's
//! operands get one GEMM of the block's width.
//!
//! Recognised: float sums over one literal width `k` of `L[i, k] * R[c, k]`
//! (plain reads, as `factor` leaves them), grouped by the unscaled rows of
//! both operands; a group needs two different widths. An operand's rows are
//! looked through elementwise nodes `M[.., k] * f` or `M[.., k] / f` with `f`
//! free of `k` and unable to fail (reading their source at their own
//! indices, or at fixed ones elsewhere: a layer `x[L - 1, b, t]` of
//! Matryoshka2d), and through reshapes and concats that keep the last dim. Block operands are copies `base[r, off + k]`: a width
//! larger than the rows fails as the truncated read did, with an index out
//! of range. Values are the same products regrouped (the rounding of a
//! reassociated sum).

use super::factor::infallible;
use super::Report;
use crate::grad::push_comp;
use crate::ir::{
    BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp, Reduce,
};
use std::collections::BTreeMap;

/// Every group of prefix contractions of the same rows, computed by blocks
/// (module doc).
pub fn prefix(g: &Graph, report: &mut Report) -> Graph {
    let members = groups(g);
    if members.is_empty() {
        return g.clone();
    }
    // Per group: the running sums by width, once its first member is
    // reached.
    let mut sums: BTreeMap<usize, BTreeMap<i64, NodeId>> = BTreeMap::new();
    let mut at = 0;
    super::insert_before(g, report, "prefix", |out, node| {
        let index = at;
        at += 1;
        let Some((group, widths)) = members.get(&index) else {
            return false;
        };
        rewrite(out, node, *group, widths, &mut sums).is_some()
    })
}

/// How a node's rows relate to the rows of the node it reads.
enum Step {
    /// `out[.., k] = src[.., k]` times factors free of `k` (`true`: divide);
    /// `fixed` gives the read's indices that are not the node's own, by
    /// position (a layer, `x[L - 1, b, t]`; `None`: the next variable).
    Scaled {
        src: NodeId,
        fixed: Vec<Option<Expr>>,
        factors: Vec<(Expr, bool)>,
        vars: Vec<IdxVar>,
    },
    Reshape {
        src: NodeId,
    },
    Concat {
        axis: usize,
        parts: Vec<NodeId>,
    },
    /// The node's rows are its own.
    Leaf,
}

fn step(g: &Graph, id: NodeId) -> Step {
    let node = g.node(id);
    let rank = node.shape.len();
    if node.dtype != DType::Float || rank < 2 {
        return Step::Leaf;
    }
    match &node.kind {
        NodeKind::Comp(c) if c.reduce.is_none() => {
            let last = c.indices[rank - 1];
            let mut factors = Vec::new();
            let Some((src, fixed)) = scaled_read(&c.body, &c.indices, last, &mut factors) else {
                return Step::Leaf;
            };
            let own: Vec<&Dim> = g
                .node(src)
                .shape
                .iter()
                .zip(&fixed)
                .filter(|(_, f)| f.is_none())
                .map(|(d, _)| d)
                .collect();
            let rows_agree = own[..rank - 1]
                .iter()
                .zip(&node.shape)
                .all(|(a, b)| *a == b);
            if g.node(src).dtype != DType::Float || !rows_agree {
                return Step::Leaf;
            }
            Step::Scaled {
                src,
                fixed,
                factors,
                vars: c.indices[..rank - 1].to_vec(),
            }
        }
        NodeKind::Reshape { src } => {
            let s = &g.node(*src).shape;
            if s.len() >= 2 && s.last() == node.shape.last() {
                Step::Reshape { src: *src }
            } else {
                Step::Leaf
            }
        }
        NodeKind::Concat { axis, parts } if *axis + 1 < rank => Step::Concat {
            axis: *axis,
            parts: parts.clone(),
        },
        _ => Step::Leaf,
    }
}

/// `e` as a read of one node at `vars` in order, the last one last, and
/// otherwise at fixed indices (free of index variables and unable to fail),
/// multiplied and divided by factors free of `last` that cannot fail
/// (collected into `factors`): the node and the fixed indices by position.
fn scaled_read(
    e: &Expr,
    vars: &[IdxVar],
    last: IdxVar,
    factors: &mut Vec<(Expr, bool)>,
) -> Option<(NodeId, Vec<Option<Expr>>)> {
    let free = |f: &Expr| !f.vars().contains(&last) && infallible(f);
    match e {
        Expr::Read { node, at } => {
            let mut next = vars.iter();
            let mut want = next.next();
            let mut fixed = Vec::with_capacity(at.len());
            for a in at {
                match (a, want) {
                    (Expr::Index(v), Some(w)) if v == w => {
                        fixed.push(None);
                        want = next.next();
                    }
                    _ if a.vars().is_empty() && a.reads().is_empty() && infallible(a) => {
                        fixed.push(Some(a.clone()));
                    }
                    _ => return None,
                }
            }
            (want.is_none() && at.last() == Some(&Expr::Index(last))).then_some((*node, fixed))
        }
        Expr::Binary(BinOp::Div, a, f) if free(f) => {
            let src = scaled_read(a, vars, last, factors)?;
            factors.push((f.as_ref().clone(), true));
            Some(src)
        }
        Expr::Binary(BinOp::Mul, a, b) => {
            if free(b) {
                if let Some(src) = scaled_read(a, vars, last, factors) {
                    factors.push((b.as_ref().clone(), false));
                    return Some(src);
                }
            }
            if free(a) {
                let src = scaled_read(b, vars, last, factors)?;
                factors.push((a.as_ref().clone(), false));
                return Some(src);
            }
            None
        }
        _ => None,
    }
}

/// The unscaled rows a node views, as a tree of layout steps over a leaf.
#[derive(Clone, Debug, PartialEq)]
enum Base {
    Leaf(NodeId),
    /// A node read at fixed indices in some positions (`Step::Scaled`).
    Fixed(NodeId, Vec<Option<Expr>>),
    Reshape(Box<Base>, Vec<Dim>),
    Concat(usize, Vec<Base>),
}

fn base(g: &Graph, id: NodeId) -> Base {
    match step(g, id) {
        Step::Scaled { src, fixed, .. } if fixed.iter().any(Option::is_some) => {
            Base::Fixed(src, fixed)
        }
        Step::Scaled { src, .. } => base(g, src),
        Step::Reshape { src } => {
            let shape = &g.node(id).shape;
            Base::Reshape(Box::new(base(g, src)), shape[..shape.len() - 1].to_vec())
        }
        Step::Concat { axis, parts } => {
            Base::Concat(axis, parts.iter().map(|p| base(g, *p)).collect())
        }
        Step::Leaf => Base::Leaf(id),
    }
}

/// A contraction `sum(k: w) L[i, k] * R[c, k]` with a literal `w`: `(L, R,
/// w)`.
fn contraction(node: &Node) -> Option<(NodeId, NodeId, i64)> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    if node.dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() || r.over.len() != 1 {
        return None;
    }
    let (k, w) = (r.over[0].0, r.over[0].1.as_lit()?);
    let [i, j] = c.indices[..] else {
        return None;
    };
    let Expr::Binary(BinOp::Mul, a, b) = &c.body else {
        return None;
    };
    let read = |e: &Expr, outer: IdxVar| match e {
        Expr::Read { node, at } if *at == [Expr::Index(outer), Expr::Index(k)] => Some(*node),
        _ => None,
    };
    Some((read(a, i)?, read(b, j)?, w))
}

/// The members of every group with two or more widths: node index ->
/// (group, the group's widths in increasing order).
fn groups(g: &Graph) -> BTreeMap<usize, (usize, Vec<i64>)> {
    let mut keys: Vec<(Base, Base)> = Vec::new();
    let mut found: Vec<(usize, usize, i64)> = Vec::new();
    for (x, node) in g.nodes.iter().enumerate() {
        let Some((l, r, w)) = contraction(node) else {
            continue;
        };
        if g.node(l).shape.len() != 2 || g.node(r).shape.len() != 2 || w <= 0 {
            continue;
        }
        let key = (base(g, l), base(g, r));
        let group = match keys.iter().position(|k| *k == key) {
            Some(p) => p,
            None => {
                keys.push(key);
                keys.len() - 1
            }
        };
        found.push((x, group, w));
    }
    let mut out = BTreeMap::new();
    for group in 0..keys.len() {
        let mut widths: Vec<i64> = found.iter().filter(|f| f.1 == group).map(|f| f.2).collect();
        widths.sort_unstable();
        widths.dedup();
        if widths.len() < 2 {
            continue;
        }
        for f in found.iter().filter(|f| f.1 == group) {
            out.insert(f.0, (group, widths.clone()));
        }
    }
    out
}

/// The node holding `b`'s rows, built in `out` where it is a layout of
/// several nodes.
fn emit_base(out: &mut Graph, b: &Base) -> Option<NodeId> {
    let (kind, shape) = match b {
        Base::Leaf(id) => return Some(*id),
        Base::Fixed(src, fixed) => {
            let (mut shape, mut vars, mut at) = (Vec::new(), Vec::new(), Vec::new());
            for (d, f) in out.node(*src).shape.clone().iter().zip(fixed) {
                match f {
                    Some(e) => at.push(e.clone()),
                    None => {
                        let v = out.new_index("r");
                        shape.push(d.clone());
                        vars.push(v);
                        at.push(Expr::Index(v));
                    }
                }
            }
            let body = Expr::read(*src, at);
            return Some(push_comp(out, vars, shape, None, body, None));
        }
        Base::Reshape(inner, lead) => {
            let src = emit_base(out, inner)?;
            let mut shape = lead.clone();
            shape.push(out.node(src).shape.last()?.clone());
            (NodeKind::Reshape { src }, shape)
        }
        Base::Concat(axis, parts) => {
            let ids = parts
                .iter()
                .map(|p| emit_base(out, p))
                .collect::<Option<Vec<_>>>()?;
            let mut shape = out.node(ids[0]).shape.clone();
            for p in &ids[1..] {
                let s = &out.node(*p).shape;
                if s.len() != shape.len() || s.last() != shape.last() {
                    return None;
                }
                shape[*axis] = shape[*axis].add(&s[*axis]);
            }
            (
                NodeKind::Concat {
                    axis: *axis,
                    parts: ids,
                },
                shape,
            )
        }
    };
    Some(out.push(Node {
        kind,
        dtype: DType::Float,
        shape,
        name: None,
        span: None,
    }))
}

/// The per-row scale of node `id` over its base (`None`: one), built in
/// `out`: a node of `id`'s shape without its last dim.
fn emit_scale(out: &mut Graph, id: NodeId) -> Option<NodeId> {
    let shape = out.node(id).shape.clone();
    let rows = shape[..shape.len() - 1].to_vec();
    match step(out, id) {
        Step::Leaf => None,
        Step::Scaled {
            src,
            fixed,
            factors,
            vars,
        } => {
            let inner = if fixed.iter().all(Option::is_none) {
                emit_scale(out, src)
            } else {
                None
            };
            let fresh: Vec<IdxVar> = vars.iter().map(|_| out.new_index("r")).collect();
            let rename: BTreeMap<IdxVar, Expr> = vars
                .iter()
                .zip(&fresh)
                .map(|(v, f)| (*v, Expr::Index(*f)))
                .collect();
            let at: Vec<Expr> = fresh.iter().map(|f| Expr::Index(*f)).collect();
            let mut body = inner.map_or(Expr::Float(1.0), |s| Expr::read(s, at));
            for (f, divide) in factors {
                let op = if divide { BinOp::Div } else { BinOp::Mul };
                body = Expr::binary(op, body, f.subst(&rename));
            }
            Some(push_comp(
                out,
                fresh,
                rows,
                None,
                body,
                Some("prefix.scale".into()),
            ))
        }
        Step::Reshape { src } => {
            let s = emit_scale(out, src)?;
            Some(out.push(Node {
                kind: NodeKind::Reshape { src: s },
                dtype: DType::Float,
                shape: rows,
                name: None,
                span: None,
            }))
        }
        Step::Concat { axis, parts } => {
            let scales: Vec<Option<NodeId>> = parts.iter().map(|p| emit_scale(out, *p)).collect();
            if scales.iter().all(Option::is_none) {
                return None;
            }
            let ids = parts
                .iter()
                .zip(scales)
                .map(|(p, s)| {
                    s.unwrap_or_else(|| {
                        let ps = out.node(*p).shape.clone();
                        let vars = ps[..ps.len() - 1]
                            .iter()
                            .map(|_| out.new_index("r"))
                            .collect();
                        push_comp(
                            out,
                            vars,
                            ps[..ps.len() - 1].to_vec(),
                            None,
                            Expr::Float(1.0),
                            None,
                        )
                    })
                })
                .collect();
            Some(out.push(Node {
                kind: NodeKind::Concat { axis, parts: ids },
                dtype: DType::Float,
                shape: rows,
                name: None,
                span: None,
            }))
        }
    }
}

/// Columns `off .. off + w` of a rank-2 base, as a node of their own.
fn block(out: &mut Graph, base: NodeId, off: i64, w: i64) -> NodeId {
    let rows = out.node(base).shape[0].clone();
    let (r, k) = (out.new_index("r"), out.new_index("k"));
    let col = match off {
        0 => Expr::Index(k),
        _ => Expr::binary(BinOp::Add, Expr::Index(k), Expr::Int(off)),
    };
    let body = Expr::read(base, vec![Expr::Index(r), col]);
    push_comp(
        out,
        vec![r, k],
        vec![rows, Dim::lit(w)],
        None,
        body,
        Some("prefix.block".into()),
    )
}

/// Member `node` of `group`: builds the group's running sums at its first
/// member, then reads them scaled.
fn rewrite(
    out: &mut Graph,
    node: &mut Node,
    group: usize,
    widths: &[i64],
    sums: &mut BTreeMap<usize, BTreeMap<i64, NodeId>>,
) -> Option<()> {
    let (l, r, w) = contraction(node)?;
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let (i, j) = (c.indices[0], c.indices[1]);
    if let std::collections::btree_map::Entry::Vacant(v) = sums.entry(group) {
        v.insert(running_sums(out, node, l, r, widths)?);
    }
    let p = *sums.get(&group)?.get(&w)?;
    let (ls, rs) = (emit_scale(out, l), emit_scale(out, r));
    let mut body = Expr::read(p, vec![Expr::Index(i), Expr::Index(j)]);
    let scales = [(rs, j), (ls, i)];
    for (s, v) in scales.into_iter().filter_map(|(s, v)| Some((s?, v))) {
        body = Expr::binary(BinOp::Mul, Expr::read(s, vec![Expr::Index(v)]), body);
    }
    node.kind = NodeKind::Comp(Comp {
        indices: vec![i, j],
        reduce: None,
        body,
    });
    Some(())
}

/// The running sums of one group, by width: the block contractions of the
/// unscaled rows of `l` and `r` between successive `widths`, added up, in
/// `node`'s shape.
fn running_sums(
    out: &mut Graph,
    node: &Node,
    l: NodeId,
    r: NodeId,
    widths: &[i64],
) -> Option<BTreeMap<i64, NodeId>> {
    let name = node.name.clone().unwrap_or_else(|| "contraction".into());
    let bl = emit_base(out, &base(out, l))?;
    let br = emit_base(out, &base(out, r))?;
    if out.node(bl).shape.len() != 2 || out.node(br).shape.len() != 2 {
        return None;
    }
    let mut by_width = BTreeMap::new();
    let (mut prev, mut running): (i64, Option<NodeId>) = (0, None);
    for &width in widths {
        let (a, b) = (
            block(out, bl, prev, width - prev),
            block(out, br, prev, width - prev),
        );
        let (x, y, k) = (out.new_index("i"), out.new_index("c"), out.new_index("k"));
        let body = Expr::binary(
            BinOp::Mul,
            Expr::read(a, vec![Expr::Index(x), Expr::Index(k)]),
            Expr::read(b, vec![Expr::Index(y), Expr::Index(k)]),
        );
        let reduce = Reduce {
            op: RedOp::Sum,
            over: vec![(k, Dim::lit(width - prev))],
            filter: None,
            empty: 0.0,
        };
        let q = push_comp(
            out,
            vec![x, y],
            node.shape.clone(),
            Some(reduce),
            body,
            Some(format!("{name}.block")),
        );
        let p = match running {
            None => q,
            Some(p) => {
                let (x, y) = (out.new_index("i"), out.new_index("c"));
                let at = vec![Expr::Index(x), Expr::Index(y)];
                let body = Expr::binary(BinOp::Add, Expr::read(p, at.clone()), Expr::read(q, at));
                push_comp(
                    out,
                    vec![x, y],
                    node.shape.clone(),
                    None,
                    body,
                    Some(format!("{name}.prefix")),
                )
            }
        };
        by_width.insert(width, p);
        running = Some(p);
        prev = width;
    }
    Some(by_width)
}
