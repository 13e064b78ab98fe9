//! Factors that do not depend on a sum's reduced indices move out of it
//! (`hoist`).
//!
//! The gradient of a normalisation, `x[i, k] / clamp_min(sqrt(n[i]), eps)`,
//! with respect to `n` arrives as
//!
//! ```text
//! d[i] = sum(k) (if sqrt(n[i]) > 0 then (... -(0.5 * (g[i, k] * x[i, k] / c[i]) / c[i]) ...) / sqrt(n[i]) else 0)
//! ```
//!
//! which divides twice per element by values of `i` alone. `hoist` sees the
//! body as a linear function of its *core*, the product of the factors that
//! mention a reduced index: `outer(core)`, where `outer` multiplies and
//! divides by factors free of the reduced indices, negates, and applies
//! `if c then · else 0` with `c` free of them. Then `sum(k) outer(core_k) =
//! outer(sum(k) core_k)`:
//!
//! ```text
//! s[i] = sum(k) g[i, k] * x[i, k]
//! d[i] = if sqrt(n[i]) > 0 then (... -(s[i] * 0.5 / c[i] / c[i]) ...) / sqrt(n[i]) else 0
//! ```
//!
//! Values are the same terms with the factors applied to their sum (the
//! rounding of a reassociated product). A sum over an empty range keeps its
//! empty value (the factors could turn `0` into NaN): where a reduced extent
//! is not a constant, the result checks it. Only unfiltered float sums are
//! rewritten; the factors moved out must be unable to fail (reads at index
//! variables or constants, no `if`, no integer division), and so must the
//! core when an `if` moves out (it is then evaluated where it was not).

use super::factor::infallible;
use super::Report;
use crate::ir::{
    BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp, UnOp,
};

/// Every sum with factors free of its reduced indices, split in two (module
/// doc).
pub fn hoist(g: &Graph, report: &mut Report) -> Graph {
    let mut squares = 0;
    let g = super::insert_before(g, report, "hoist", |out, node| {
        let mut any = false;
        if let Some(parts) = norms_of_parts(out, node) {
            let mut ids = Vec::with_capacity(parts.len());
            for (mut part, reshaped) in parts {
                squares += expand_square(out, &mut part) as usize;
                any |= hoist_into(out, &mut part);
                let mut id = out.push(part);
                if let Some(shape) = reshaped {
                    id = out.push(Node {
                        kind: NodeKind::Reshape { src: id },
                        dtype: DType::Float,
                        shape,
                        name: node.name.clone(),
                        span: node.span,
                    });
                }
                ids.push(id);
            }
            node.kind = NodeKind::Concat {
                axis: 0,
                parts: ids,
            };
            squares += 1;
            return any;
        }
        squares += expand_square(out, node) as usize;
        hoist_into(out, node)
    });
    if squares > 0 {
        *report.fired.entry("hoist-square").or_insert(0) += squares;
    }
    g
}

/// `split` of `node`, its sum pushed into `out`; whether it split.
fn hoist_into(out: &mut Graph, node: &mut Node) -> bool {
    match split(node, NodeId(out.nodes.len() as u32)) {
        Some((sum, outer)) => {
            out.nodes.push(sum);
            node.kind = NodeKind::Comp(outer);
            true
        }
        None => false,
    }
}

/// A squared norm of rows, `r[c] = sum(k) x[c, k] * x[c, k]`, of a concat
/// of parts along its rows, as one such norm per part (to be joined by a
/// concat): MNRL's documents are the positives and the negatives joined,
/// and `cos_sim` takes their norms. A part that reshapes a node `[.., K]`
/// into rows (the negatives, `[N, B, D]` as `[N·B, D]`) gets the norm of
/// that node over its last index, reshaped (the second of each pair). So
/// `expand_square` can see each part's scaled rows.
fn norms_of_parts(graph: &mut Graph, node: &Node) -> Option<Vec<(Node, Option<Vec<Dim>>)>> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    let ([row], [(k, extent)]) = (&c.indices[..], &r.over[..]) else {
        return None;
    };
    if node.dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() {
        return None;
    }
    let Expr::Binary(BinOp::Mul, a, b) = &c.body else {
        return None;
    };
    let at = vec![Expr::Index(*row), Expr::Index(*k)];
    let concat = match (a.as_ref(), b.as_ref()) {
        (Expr::Read { node: n, at: x }, Expr::Read { node: m, at: y })
            if n == m && *x == at && *y == at =>
        {
            *n
        }
        _ => return None,
    };
    let NodeKind::Concat { axis: 0, parts } = &graph.node(concat).kind else {
        return None;
    };
    // Each part's rows: the part, or the node a reshape of `[.., K]` whose
    // last dim stays takes them from (the norm over it, reshaped).
    let mut rows = Vec::with_capacity(parts.len());
    for p in parts {
        let part = graph.node(*p);
        if part.shape.len() != 2 {
            return None;
        }
        rows.push(match &part.kind {
            NodeKind::Reshape { src }
                if graph.node(*src).shape.len() >= 2
                    && graph.node(*src).shape.last() == part.shape.last() =>
            {
                (*src, Some(vec![part.shape[0].clone()]))
            }
            _ => (*p, None),
        });
    }
    // Only where some part's rows are scaled copies (else nothing to gain).
    if !rows.iter().any(|(src, _)| scales_rows(graph, *src)) {
        return None;
    }
    let mut out = Vec::with_capacity(rows.len());
    for (src, reshaped) in rows {
        let src_shape = graph.node(src).shape.clone();
        let lead: Vec<IdxVar> = src_shape[..src_shape.len() - 1]
            .iter()
            .map(|_| graph.new_index("c"))
            .collect();
        let kv = graph.new_index("k");
        let mut read_at: Vec<Expr> = lead.iter().map(|v| Expr::Index(*v)).collect();
        read_at.push(Expr::Index(kv));
        let x = Expr::read(src, read_at);
        out.push((
            Node {
                kind: NodeKind::Comp(Comp {
                    indices: lead,
                    reduce: Some(crate::ir::Reduce {
                        op: RedOp::Sum,
                        over: vec![(kv, extent.clone())],
                        filter: None,
                        empty: r.empty,
                    }),
                    body: Expr::binary(BinOp::Mul, x.clone(), x),
                }),
                dtype: DType::Float,
                shape: src_shape[..src_shape.len() - 1].to_vec(),
                name: node.name.clone(),
                span: node.span,
            },
            reshaped,
        ));
    }
    Some(out)
}

/// Whether node `id` is elementwise `x[..] / f` or `x[..] * f` with `f`
/// free of its last index: rows scaled by a factor each (`expand_square`).
fn scales_rows(graph: &Graph, id: NodeId) -> bool {
    let NodeKind::Comp(c) = &graph.node(id).kind else {
        return false;
    };
    let (Expr::Binary(BinOp::Div | BinOp::Mul, x, f), None, Some(last)) =
        (&c.body, &c.reduce, c.indices.last())
    else {
        return false;
    };
    let plain = matches!(x.as_ref(), Expr::Read { at, .. } if at.iter().all(|i| matches!(i, Expr::Index(_))));
    plain && !mentions(f, &[*last]) && infallible(f)
}

/// `sum(k) n[.., k] * n[.., k]`, the squared norm of rows that an
/// elementwise `n = x[..] / f` (or `x[..] * f`) scales by a factor `f` free
/// of the sum's reduced indices, with `n`'s body in place of both reads:
/// `split` then takes `f` out, leaving `sum(k) x * x`, which `cse` merges
/// with the norm `f` itself was made from. A Matryoshka truncation
/// normalises its rows, and the inner loss's `cos_sim` takes their norms
/// again: this keeps the normalised copy from being made only for that.
fn expand_square(graph: &Graph, node: &mut Node) -> bool {
    let NodeKind::Comp(c) = &mut node.kind else {
        return false;
    };
    let Some(r) = &c.reduce else { return false };
    if node.dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() {
        return false;
    }
    let Expr::Binary(BinOp::Mul, a, b) = &c.body else {
        return false;
    };
    let (Expr::Read { node: n, at }, Expr::Read { node: m, at: at2 }) = (a.as_ref(), b.as_ref())
    else {
        return false;
    };
    // Rows of `n` scaled each by a factor; read at plain indices, the
    // reduced ones last, so the factor stays free of them.
    let reduced: Vec<IdxVar> = r.over.iter().map(|(v, _)| *v).collect();
    let plain = at.iter().all(|e| matches!(e, Expr::Index(_)));
    let lead_free = at.split_last().is_some_and(|(last, lead)| {
        mentions(last, &reduced) && !lead.iter().any(|e| mentions(e, &reduced))
    });
    if n != m || at != at2 || !plain || !lead_free || !scales_rows(graph, *n) {
        return false;
    }
    let NodeKind::Comp(scaled) = &graph.node(*n).kind else {
        return false;
    };
    let map = scaled
        .indices
        .iter()
        .copied()
        .zip(at.iter().cloned())
        .collect();
    let body = scaled.body.subst(&map);
    c.body = Expr::binary(BinOp::Mul, body.clone(), body);
    true
}

/// Whether `e` mentions one of `vars`.
fn mentions(e: &Expr, vars: &[IdxVar]) -> bool {
    e.vars().iter().any(|v| vars.contains(v))
}

/// `e` as a linear function of its core: `e = outer(core)` (module doc).
struct Linear {
    core: Expr,
    outer: Box<dyn Fn(Expr) -> Expr>,
    /// How many of the factors and conditions `outer` applies save work
    /// per term (`saves`).
    moved: usize,
    /// An `if` moved out: the core is then evaluated where it was not.
    conditional: bool,
}

fn identity(core: Expr) -> Linear {
    Linear {
        core,
        outer: Box::new(|s| s),
        moved: 0,
        conditional: false,
    }
}

/// Whether applying factor `f` once instead of per term saves work: a
/// division, or a factor that computes more than a product of reads and
/// constants (a square root, a clamp, an exponential). Multiplying by a
/// read alone does not pay for a node of its own.
fn saves(f: &Expr, dividing: bool) -> bool {
    let mut costly = dividing;
    f.walk(&mut |x| match x {
        Expr::Unary(op, _) if !matches!(op, UnOp::Neg | UnOp::Detach) => costly = true,
        Expr::Binary(op, ..) if !matches!(op, BinOp::Mul | BinOp::Add | BinOp::Sub) => {
            costly = true
        }
        _ => {}
    });
    costly
}

/// The factors of a product through `*`, `/` and negation, each with
/// whether it divides, and whether the product is negated.
fn factors(e: &Expr, dividing: bool, negated: &mut bool, out: &mut Vec<(Expr, bool)>) {
    match e {
        Expr::Binary(BinOp::Mul, a, b) => {
            factors(a, dividing, negated, out);
            factors(b, dividing, negated, out);
        }
        Expr::Binary(BinOp::Div, a, b) => {
            factors(a, dividing, negated, out);
            factors(b, !dividing, negated, out);
        }
        Expr::Unary(UnOp::Neg, a) => {
            *negated = !*negated;
            factors(a, dividing, negated, out);
        }
        other => out.push((other.clone(), dividing)),
    }
}

/// The factors multiplied and divided left to right (`None`: no factors).
fn product(fs: Vec<(Expr, bool)>) -> Option<Expr> {
    let mut acc: Option<Expr> = None;
    for (f, over) in fs {
        acc = Some(match (acc, over) {
            (None, false) => f,
            (None, true) => Expr::binary(BinOp::Div, Expr::Float(1.0), f),
            (Some(a), false) => Expr::binary(BinOp::Mul, a, f),
            (Some(a), true) => Expr::binary(BinOp::Div, a, f),
        });
    }
    acc
}

fn linear(e: &Expr, reduced: &[IdxVar]) -> Linear {
    match e {
        Expr::Select(c, a, b) if **b == Expr::Float(0.0) && !mentions(c, reduced) => {
            let inner = linear(a, reduced);
            let c = c.as_ref().clone();
            let outer = inner.outer;
            Linear {
                core: inner.core,
                outer: Box::new(move |s| {
                    Expr::Select(
                        Box::new(c.clone()),
                        Box::new(outer(s)),
                        Box::new(Expr::Float(0.0)),
                    )
                }),
                moved: inner.moved + 1,
                conditional: true,
            }
        }
        Expr::Binary(BinOp::Mul | BinOp::Div, ..) | Expr::Unary(UnOp::Neg, _) => {
            let mut negated = false;
            let mut fs = Vec::new();
            factors(e, false, &mut negated, &mut fs);
            let (varying, fixed): (Vec<_>, Vec<_>) = fs
                .into_iter()
                .partition(|(f, _)| mentions(f, reduced) || !infallible(f));
            // One varying factor, not dividing: its own factors may move too.
            let inner = match &varying[..] {
                [(f, false)] => linear(f, reduced),
                _ => match product(varying) {
                    Some(core) => identity(core),
                    None => return identity(e.clone()),
                },
            };
            let moved = inner.moved + fixed.iter().filter(|(f, d)| saves(f, *d)).count();
            let outer = inner.outer;
            Linear {
                core: inner.core,
                outer: Box::new(move |s| {
                    let mut fs = vec![(outer(s), false)];
                    fs.extend(fixed.iter().cloned());
                    let p = product(fs).expect("at least the sum");
                    if negated {
                        Expr::unary(UnOp::Neg, p)
                    } else {
                        p
                    }
                }),
                moved,
                conditional: inner.conditional,
            }
        }
        other => identity(other.clone()),
    }
}

/// For a sum with factors free of its reduced indices: the sum of its core
/// (to get id `id`) and the node itself rebuilt around it.
fn split(node: &Node, id: NodeId) -> Option<(Node, Comp)> {
    let NodeKind::Comp(c) = &node.kind else {
        return None;
    };
    let r = c.reduce.as_ref()?;
    if node.dtype != DType::Float || r.op != RedOp::Sum || r.filter.is_some() {
        return None;
    }
    let reduced: Vec<IdxVar> = r.over.iter().map(|(v, _)| *v).collect();
    let Linear {
        core,
        outer,
        moved,
        conditional,
    } = linear(&c.body, &reduced);
    if moved == 0 || !mentions(&core, &reduced) || (conditional && !infallible(&core)) {
        return None;
    }
    let sum = Node {
        kind: NodeKind::Comp(Comp {
            indices: c.indices.clone(),
            reduce: Some(r.clone()),
            body: core,
        }),
        dtype: DType::Float,
        shape: node.shape.clone(),
        name: Some(format!(
            "{}.sum",
            node.name.clone().unwrap_or_else(|| "reduction".into())
        )),
        span: node.span,
    };
    let read = Expr::read(id, c.indices.iter().map(|v| Expr::Index(*v)).collect());
    let mut value = outer(read);
    // An empty range gives the empty value, whatever the factors are.
    let empty_range = r
        .over
        .iter()
        .filter(|(_, d)| d.as_lit().is_none_or(|n| n == 0))
        .map(|(_, d)| Expr::binary(BinOp::Eq, Expr::dim(d), Expr::Int(0)))
        .reduce(|a, b| Expr::binary(BinOp::Or, a, b));
    if let Some(e) = empty_range {
        value = Expr::Select(Box::new(e), Box::new(Expr::Float(r.empty)), Box::new(value));
    }
    Some((
        sum,
        Comp {
            indices: c.indices.clone(),
            reduce: None,
            body: value,
        },
    ))
}
