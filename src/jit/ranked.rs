//! Pair reductions filtered by a rank comparison, in `O(N log N)` instead of
//! `O(M·N)`.
//!
//! CoSENT's loss is `logsumexp(i, j | l[i] < l[j]) (s[i] - s[j])`, and its
//! gradient sums `c * exp(s[i] - s[j] - L)` over the same pairs, once per `i`
//! and once per `j`. Written as loops, each visits all `B²` pairs. But the
//! body separates into a part of `i` and a part of `j`, and the filter
//! compares a key of `i` with a key of `j`: for each `i` the passing `j` are
//! a prefix or a suffix of the `j` sorted by key. So
//!
//! ```text
//! logsumexp(j | a[i] < b[j]) (F(i) + G(j)) = F(i) + W[i]
//! sum(j | a[i] < b[j]) P(i) * exp(F(i) + G(j)) = P(i) * exp(F(i) + W[i])
//!     where W[i] = logsumexp(j | a[i] < b[j]) G(j)
//! ```
//!
//! and `W` is one sort of the `j` by key, a running logsumexp along it, and
//! a binary search per `i` (`evaluate`).
//!
//! * **Lowering** (`rewrite`, from `lower.rs`). A float `sum` or `logsumexp`
//!   with the filter `A <op> B` (`<`, `<=`, `>`, `>=`) where one side
//!   mentions only a reduced index `y` and the other only one other index
//!   `x` (an output index, or another reduced one), and whose body is
//!   `F + G` (logsumexp) or `±P · exp(F + G)` (sum) with `G` mentioning only
//!   `y` and `F`, `P` no `y`, becomes: vectors for the keys and for `G`
//!   (unless they are plain reads already), the node `W[x] = logsumexp(y |
//!   kx[x] <op> ky[y]) g[y]` (`Ranked`), and the node itself without `y`,
//!   `if W[x] == -inf then empty else F + W[x]` (or `±P · exp(F + W[x])`).
//!   Only expressions that can never fail are moved into vectors (they are
//!   then evaluated for every `y`, not only where a pair passes): reads at
//!   index variables over exactly the dims they read, no `if`, no integer
//!   division.
//! * **Run** (`run.rs`). `W` is computed by `evaluate` when every key is a
//!   number and every `g` is below `+inf` and not NaN; otherwise by its
//!   compiled loop nest over all pairs, with the interpreter's semantics.
//! * **Values.** The same terms summed in another order and regrouped
//!   (`exp(F + G)` as `exp(F + W)`), in f64: they agree with the
//!   interpreter to the rounding of a sum (`JitProgram::reordered_nodes`
//!   lists the rewritten nodes).

use crate::interp::Real;
use crate::ir::{BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp};
use crate::ir::{Reduce, UnOp};

/// How a key of `x` compares with a key of `y` for the pair to pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn of(op: BinOp) -> Option<Cmp> {
        Some(match op {
            BinOp::Lt => Cmp::Lt,
            BinOp::Le => Cmp::Le,
            BinOp::Gt => Cmp::Gt,
            BinOp::Ge => Cmp::Ge,
            _ => return None,
        })
    }

    /// The comparison with its sides swapped: `a < b` is `b > a`.
    fn flipped(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
        }
    }

    fn op(self) -> BinOp {
        match self {
            Cmp::Lt => BinOp::Lt,
            Cmp::Le => BinOp::Le,
            Cmp::Gt => BinOp::Gt,
            Cmp::Ge => BinOp::Ge,
        }
    }
}

/// A node `W[x] = logsumexp(y | kx[x] <op> ky[y]) g[y]` of three float
/// vectors, computed by sorting (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ranked {
    pub key_x: NodeId,
    pub key_y: NodeId,
    pub values: NodeId,
    pub cmp: Cmp,
}

/// A plain read `v[i]` of a float vector at index variable `i`: the vector.
fn vector_read(graph: &Graph, e: &Expr, i: IdxVar) -> Option<NodeId> {
    match e {
        Expr::Read { node, at } if at[..] == [Expr::Index(i)] => {
            let n = graph.node(*node);
            (n.dtype == DType::Float && n.shape.len() == 1).then_some(*node)
        }
        _ => None,
    }
}

/// The `Ranked` node `node` is, if it is one.
pub(super) fn recognise(graph: &Graph, node: &Node) -> Option<Ranked> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    let ([x], [(y, ydim)]) = (&c.indices[..], &r.over[..]) else {
        return None;
    };
    if node.dtype != DType::Float || r.op != RedOp::LogSumExp || r.empty != f64::NEG_INFINITY {
        return None;
    }
    let Some(Expr::Binary(op, a, b)) = &r.filter else {
        return None;
    };
    let cmp = Cmp::of(*op)?;
    let (key_x, key_y, cmp) = match (vector_read(graph, a, *x), vector_read(graph, b, *y)) {
        (Some(kx), Some(ky)) => (kx, ky, cmp),
        _ => (
            vector_read(graph, b, *x)?,
            vector_read(graph, a, *y)?,
            cmp.flipped(),
        ),
    };
    let values = vector_read(graph, &c.body, *y)?;
    let fits = |id: NodeId, d: &Dim| graph.node(id).shape[0] == *d;
    (fits(key_x, &node.shape[0]) && fits(key_y, ydim) && fits(values, ydim)).then_some(Ranked {
        key_x,
        key_y,
        values,
        cmp,
    })
}

/// `W[x]` for every `x` (module doc), or `false` (nothing written) when a
/// key is NaN or a value is NaN or `+inf`: the compiled loop nest then
/// computes it with the interpreter's semantics. Sums run in f64.
pub(super) fn evaluate<F: Real>(
    key_x: &[F],
    key_y: &[F],
    values: &[F],
    cmp: Cmp,
    out: &mut [F],
) -> bool {
    let f = |v: F| v.to_f64().unwrap_or(f64::NAN);
    if key_x.iter().chain(key_y).any(|k| k.is_nan())
        || values.iter().any(|v| v.is_nan() || f(*v) == f64::INFINITY)
    {
        return false;
    }
    // Keys with their values, sorted by key (ties in any order: a tie
    // passes or fails for every `x` alike).
    let mut pairs: Vec<(f64, f64)> = key_y
        .iter()
        .zip(values)
        .map(|(k, v)| (f(*k), f(*v)))
        .collect();
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    let sorted: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let n = sorted.len();
    // `running[k]`: the logsumexp of the values at sorted positions `k..n`
    // (`<`, `<=`: the keys above `x`'s) or `0..k` (`>`, `>=`).
    let suffix = matches!(cmp, Cmp::Lt | Cmp::Le);
    let mut running = vec![f64::NEG_INFINITY; n + 1];
    let (mut m, mut s) = (f64::NEG_INFINITY, 0.0f64);
    for step in 0..n {
        let (pos, at) = if suffix {
            (n - 1 - step, n - 1 - step)
        } else {
            (step, step + 1)
        };
        let g = pairs[pos].1;
        if g > m {
            s = s * (m - g).exp() + 1.0;
            m = g;
        } else if g > f64::NEG_INFINITY {
            s += (g - m).exp();
        }
        running[at] = if s > 0.0 {
            m + s.ln()
        } else {
            f64::NEG_INFINITY
        };
    }
    for (o, k) in out.iter_mut().zip(key_x) {
        let k = f(*k);
        let w = match cmp {
            Cmp::Lt => running[sorted.partition_point(|b| *b <= k)],
            Cmp::Le => running[sorted.partition_point(|b| *b < k)],
            Cmp::Gt => running[sorted.partition_point(|b| *b < k)],
            Cmp::Ge => running[sorted.partition_point(|b| *b <= k)],
        };
        *o = F::from_f64(w).unwrap_or_else(F::nan);
    }
    true
}

/// Whether evaluating `e` over the loops `extents` can never fail: every
/// read is at index variables whose extents are exactly the dims they read,
/// and there is no `if` and no integer division or remainder.
fn safe(graph: &Graph, e: &Expr, extents: &[(IdxVar, Dim)]) -> bool {
    let mut ok = true;
    e.walk(&mut |x| match x {
        Expr::Read { node, at } => {
            let shape = &graph.node(*node).shape;
            ok &= at.len() == shape.len()
                && at.iter().zip(shape).all(|(i, d)| match i {
                    Expr::Index(v) => extents.iter().any(|(w, e)| w == v && e == d),
                    _ => false,
                })
        }
        Expr::Select(..) | Expr::Binary(BinOp::Rem | BinOp::FloorDiv, ..) => ok = false,
        _ => {}
    });
    ok
}

/// `e` as signed terms of a sum (through `+`, `-` and negation).
fn terms(e: &Expr, negated: bool, out: &mut Vec<(bool, Expr)>) {
    match e {
        Expr::Binary(BinOp::Add, a, b) => {
            terms(a, negated, out);
            terms(b, negated, out);
        }
        Expr::Binary(BinOp::Sub, a, b) => {
            terms(a, negated, out);
            terms(b, !negated, out);
        }
        Expr::Unary(UnOp::Neg, a) => terms(a, !negated, out),
        other => out.push((negated, other.clone())),
    }
}

/// The signed terms as one expression (`0.0` when there are none).
fn sum_of(terms: &[(bool, Expr)]) -> Expr {
    let mut it = terms.iter();
    let Some((neg, first)) = it.next() else {
        return Expr::Float(0.0);
    };
    let first = if *neg {
        Expr::unary(UnOp::Neg, first.clone())
    } else {
        first.clone()
    };
    it.fold(first, |acc, (neg, t)| {
        let op = if *neg { BinOp::Sub } else { BinOp::Add };
        Expr::binary(op, acc, t.clone())
    })
}

/// `e = F + G` with `G` mentioning only `y` and `F` no `y`.
fn separate(e: &Expr, y: IdxVar) -> Option<(Expr, Expr)> {
    let mut ts = Vec::new();
    terms(e, false, &mut ts);
    let (mut f, mut g) = (Vec::new(), Vec::new());
    for t in ts {
        let vars = t.1.vars();
        if !vars.contains(&y) {
            f.push(t);
        } else if vars == [y] {
            g.push(t);
        } else {
            return None;
        }
    }
    (!g.is_empty()).then(|| (sum_of(&f), sum_of(&g)))
}

/// `e = ±P · exp(E)`: the factors `P` (none mention `y`), whether it is
/// negated, and `E`, the one factor's exponent that mentions `y`.
fn exp_product(e: &Expr, y: IdxVar) -> Option<(Vec<Expr>, bool, Expr)> {
    fn flatten(e: &Expr, negated: &mut bool, out: &mut Vec<Expr>) {
        match e {
            Expr::Binary(BinOp::Mul, a, b) => {
                flatten(a, negated, out);
                flatten(b, negated, out);
            }
            Expr::Unary(UnOp::Neg, a) => {
                *negated = !*negated;
                flatten(a, negated, out);
            }
            other => out.push(other.clone()),
        }
    }
    let (mut negated, mut factors) = (false, Vec::new());
    flatten(e, &mut negated, &mut factors);
    let mut exponent = None;
    let mut rest = Vec::new();
    for f in factors {
        if !f.vars().contains(&y) {
            rest.push(f);
            continue;
        }
        match (f, &exponent) {
            (Expr::Unary(UnOp::Exp, a), None) => exponent = Some(*a),
            _ => return None,
        }
    }
    Some((rest, negated, exponent?))
}

/// The pieces of a rewritable node (module doc): `x`, `y`, the keys of
/// `x` and of `y` and their comparison, and the body's `F`, `G`, and for a
/// sum `±P`.
struct Pieces {
    x: IdxVar,
    y: IdxVar,
    key_x: Expr,
    key_y: Expr,
    cmp: Cmp,
    f: Expr,
    g: Expr,
    product: Option<(Vec<Expr>, bool)>,
}

fn pieces(graph: &Graph, c: &Comp, r: &Reduce, y: IdxVar) -> Option<Pieces> {
    let Some(Expr::Binary(op, a, b)) = &r.filter else {
        return None;
    };
    let cmp = Cmp::of(*op)?;
    let side = |e: &Expr| -> Option<IdxVar> {
        match e.vars()[..] {
            [v] if e.dtype(graph) == DType::Float => Some(v),
            _ => None,
        }
    };
    let (va, vb) = (side(a)?, side(b)?);
    let (x, key_x, key_y, cmp) = if vb == y && va != y {
        (va, a.as_ref(), b.as_ref(), cmp)
    } else if va == y && vb != y {
        (vb, b.as_ref(), a.as_ref(), cmp.flipped())
    } else {
        return None;
    };
    let (f, g, product) = match r.op {
        RedOp::LogSumExp => {
            let (f, g) = separate(&c.body, y)?;
            (f, g, None)
        }
        RedOp::Sum => {
            let (p, negated, exponent) = exp_product(&c.body, y)?;
            let (f, g) = separate(&exponent, y)?;
            (f, g, Some((p, negated)))
        }
        _ => return None,
    };
    Some(Pieces {
        x,
        y,
        key_x: key_x.clone(),
        key_y: key_y.clone(),
        cmp,
        f,
        g,
        product,
    })
}

/// Node `node` rewritten (module doc), for the lowered graph `out` whose
/// next id it would get: the nodes to push before it, and the node itself.
pub(super) fn rewrite(out: &mut Graph, node: &Node) -> Option<(Vec<Node>, Node)> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    if node.dtype != DType::Float || recognise(out, node).is_some() {
        return None;
    }
    let extents = c.levels(&node.shape);
    let p = r
        .over
        .iter()
        .rev()
        .find_map(|(y, _)| pieces(out, c, r, *y))?;
    let extent = |v: IdxVar| {
        extents
            .iter()
            .find(|(w, _)| *w == v)
            .map(|(_, d)| d.clone())
    };
    let (xdim, ydim) = (extent(p.x)?, extent(p.y)?);
    let remaining: Vec<(IdxVar, Dim)> = r.over.iter().filter(|(v, _)| *v != p.y).cloned().collect();
    // With reduced indices left, elements without a pair contribute the
    // neutral value, which must then be the empty one.
    let neutral = match r.op {
        RedOp::Sum => 0.0,
        _ => f64::NEG_INFINITY,
    };
    if !remaining.is_empty() && r.empty != neutral {
        return None;
    }
    let fallible = |e: &Expr| !safe(out, e, &extents);
    if fallible(&p.key_x) || fallible(&p.key_y) || fallible(&p.g) {
        return None;
    }
    if p.product
        .as_ref()
        .is_some_and(|(ps, _)| ps.iter().any(fallible))
        || fallible(&p.f)
    {
        return None;
    }

    let base = out.nodes.len();
    let label = node.name.clone().unwrap_or_else(|| "reduction".into());
    let mut helpers: Vec<Node> = Vec::new();
    // A vector over `v`'s dim holding `e`, or the vector `e` reads plainly.
    let mut vector = |out: &mut Graph, e: &Expr, v: IdxVar, dim: &Dim, what: &str| -> NodeId {
        if let Some(id) = vector_read(out, e, v).filter(|id| out.node(*id).shape[0] == *dim) {
            return id;
        }
        let a = out.new_index("a");
        let body = e.subst(&std::collections::BTreeMap::from([(v, Expr::Index(a))]));
        helpers.push(Node {
            kind: NodeKind::Comp(Comp {
                indices: vec![a],
                reduce: None,
                body,
            }),
            dtype: DType::Float,
            shape: vec![dim.clone()],
            name: Some(format!("{label}.{what}")),
            span: node.span,
        });
        NodeId((base + helpers.len() - 1) as u32)
    };
    let kx = vector(out, &p.key_x, p.x, &xdim, "key_x");
    let ky = vector(out, &p.key_y, p.y, &ydim, "key_y");
    let g = vector(out, &p.g, p.y, &ydim, "terms");
    let (a, b) = (out.new_index("a"), out.new_index("b"));
    helpers.push(Node {
        kind: NodeKind::Comp(Comp {
            indices: vec![a],
            reduce: Some(Reduce {
                op: RedOp::LogSumExp,
                over: vec![(b, ydim)],
                filter: Some(Expr::binary(
                    p.cmp.op(),
                    Expr::read(kx, vec![Expr::Index(a)]),
                    Expr::read(ky, vec![Expr::Index(b)]),
                )),
                empty: f64::NEG_INFINITY,
            }),
            body: Expr::read(g, vec![Expr::Index(b)]),
        }),
        dtype: DType::Float,
        shape: vec![xdim],
        name: Some(format!("{label}.ranked")),
        span: node.span,
    });
    let w = Expr::read(
        NodeId((base + helpers.len() - 1) as u32),
        vec![Expr::Index(p.x)],
    );
    let exponent = Expr::binary(BinOp::Add, p.f, w.clone());
    let value = match p.product {
        None => exponent,
        Some((factors, negated)) => {
            let e = factors
                .into_iter()
                .rev()
                .fold(Expr::unary(UnOp::Exp, exponent), |acc, f| {
                    Expr::binary(BinOp::Mul, f, acc)
                });
            if negated {
                Expr::unary(UnOp::Neg, e)
            } else {
                e
            }
        }
    };
    let otherwise = if remaining.is_empty() {
        r.empty
    } else {
        neutral
    };
    // `W` is NaN where the loop nest met a NaN: the value is NaN then too.
    let body = Expr::Select(
        Box::new(Expr::binary(BinOp::Eq, w, Expr::Float(f64::NEG_INFINITY))),
        Box::new(Expr::Float(otherwise)),
        Box::new(value),
    );
    let reduce = (!remaining.is_empty()).then_some(Reduce {
        op: r.op,
        over: remaining,
        filter: None,
        empty: r.empty,
    });
    let rewritten = Node {
        kind: NodeKind::Comp(Comp {
            indices: c.indices.clone(),
            reduce,
            body,
        }),
        ..node.clone()
    };
    Some((helpers, rewritten))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `W[x]` over all pairs, as the loop nest computes it.
    fn by_pairs(kx: &[f64], ky: &[f64], g: &[f64], cmp: Cmp) -> Vec<f64> {
        kx.iter()
            .map(|a| {
                let passing: Vec<f64> = ky
                    .iter()
                    .zip(g)
                    .filter(|(b, _)| match cmp {
                        Cmp::Lt => *a < **b,
                        Cmp::Le => *a <= **b,
                        Cmp::Gt => *a > **b,
                        Cmp::Ge => *a >= **b,
                    })
                    .map(|(_, v)| *v)
                    .collect();
                let m = passing.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    m
                } else {
                    m + passing.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
                }
            })
            .collect()
    }

    #[test]
    fn sorted_running_logsumexp_matches_every_pair() {
        for (m, n) in [(0usize, 3usize), (3, 0), (1, 1), (7, 5), (40, 63)] {
            // Keys with ties (a few distinct values), values spread widely.
            let kx: Vec<f64> = (0..m).map(|k| ((k * 7 % 5) as f64) - 1.0).collect();
            let ky: Vec<f64> = (0..n).map(|k| ((k * 3 % 6) as f64) - 1.5).collect();
            let g: Vec<f64> = (0..n)
                .map(|k| {
                    if k % 9 == 4 {
                        f64::NEG_INFINITY
                    } else {
                        (k as f64 * 1.7).sin() * 40.0
                    }
                })
                .collect();
            for cmp in [Cmp::Lt, Cmp::Le, Cmp::Gt, Cmp::Ge] {
                let want = by_pairs(&kx, &ky, &g, cmp);
                let mut got = vec![0.0; m];
                assert!(evaluate(&kx, &ky, &g, cmp, &mut got));
                for (k, (w, v)) in want.iter().zip(&got).enumerate() {
                    let ok = (w == v) || (w - v).abs() <= 1e-12 * w.abs().max(1.0);
                    assert!(ok, "{cmp:?} m={m} n={n} x={k}: sorted {v}, pairs {w}");
                }
            }
        }
    }

    #[test]
    fn a_nan_key_or_value_leaves_the_node_to_its_loop_nest() {
        let mut out = vec![0.0f32; 2];
        for (kx, ky, g) in [
            ([f32::NAN, 0.0], [1.0, 2.0], [0.0, 0.0]),
            ([0.0, 0.0], [1.0, f32::NAN], [0.0, 0.0]),
            ([0.0, 0.0], [1.0, 2.0], [f32::NAN, 0.0]),
            ([0.0, 0.0], [1.0, 2.0], [0.0, f32::INFINITY]),
        ] {
            assert!(!evaluate(&kx, &ky, &g, Cmp::Lt, &mut out));
        }
        assert!(evaluate(
            &[0.0f32, 5.0],
            &[1.0, 2.0],
            &[0.0, 0.0],
            Cmp::Lt,
            &mut out
        ));
        assert!((out[0] - 2.0f32.ln()).abs() < 1e-6, "{out:?}");
        assert_eq!(out[1], f32::NEG_INFINITY);
    }
}
