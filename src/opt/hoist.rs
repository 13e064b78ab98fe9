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
use crate::ir::{BinOp, Comp, DType, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp, UnOp};

/// Every sum with factors free of its reduced indices, split in two (module
/// doc).
pub fn hoist(g: &Graph, report: &mut Report) -> Graph {
    super::insert_before(g, report, "hoist", |out, node| {
        match split(node, NodeId(out.nodes.len() as u32)) {
            Some((sum, outer)) => {
                out.nodes.push(sum);
                node.kind = NodeKind::Comp(outer);
                true
            }
            None => false,
        }
    })
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
