//! A logsumexp's exponentials, computed once for its softmax (`softmax`).
//!
//! The gradient of `L[i] = logsumexp(c) f(i, c)` is the softmax
//! `exp(f(i, c) - L[i])`, and the node that reads it (MNRL's adjoint of
//! the scores, a cross-entropy's of its logits) computes one exponential per
//! element, after `L` computed one per element for its sum. Each costs about
//! as much as the rest of both passes. So the gradient program computes them
//! once:
//!
//! ```text
//! M[i]    = max(c | f(i, c) == f(i, c)) f(i, c)          # logsumexp's shift: NaN skipped
//! E[i, c] = exp(f(i, c) - M[i])
//! S[i]    = sum(c) E[i, c]
//! Q[i]    = if M[i] - M[i] == 0 then 1 / S[i] else 1
//! L[i]    = if M[i] - M[i] == 0 then M[i] + log(S[i]) else M[i]
//! ```
//!
//! and every `exp(f(a, b) - L[a])` of a later node reads `E[a, b] * Q[a]`.
//!
//! * Values. `L` is the interpreter's logsumexp step for step: the same
//!   shift (the largest value, NaN skipped; an infinite one or none at all
//!   is the result itself), the same exponentials summed in the same order.
//!   Where the shift is finite, the softmax `E / S` differs from
//!   `exp(f - L)` by rounding (it no longer carries `L`'s rounding, about an
//!   ulp of `L` relative); where it is infinite, `Q` is 1 and `E` is
//!   `exp(f - L)` itself, NaN and zeros alike.
//! * Conditions. `L` reduces over one variable, with the default empty value
//!   (`-inf`), and its body and filter cannot fail (reads at index variables
//!   and constants, no `if`, no integer division), since `E` evaluates the
//!   body wherever the filter holds, whether or not a reader needs it there
//!   (with a filter, `E` is 0 where it fails, and `M` skips those elements).
//!   The filter may only be a mask (a read of a bool node: GIST's false
//!   negatives): one that compares keys of the two sides (CoSENT's ranks)
//!   runs sorted in the JIT (`jit::ranked`), in `O(N log N)`, which a
//!   materialised `E` would undo.
//!   A reader's `exp(g - L[a])` is rewritten only where `g` is the body at
//!   index variables of the reader whose ranges are `E`'s dims, so every
//!   read of `E` is in range.
//! * Layout. When the body is a plain read `X[..]` of the variables, `E` has
//!   `X`'s layout (a logsumexp down the columns of `X` gets a row-major `E`
//!   like `X`'s, read contiguously by the readers that read `X`).
//! * Memory. `E` is one more node of the scores' shape, freed after its
//!   last reader; where the scores are streamed (`stream.rs`), so is `E`,
//!   tiles only.
//!
//! The pass runs on gradient programs only (`super::optimize_gradient`): a
//! graph still to be differentiated would carry the max into its gradient.

use super::factor::infallible;
use super::Report;
use crate::ir::{
    BinOp, Comp, DType, Dim, Expr, Graph, IdxVar, Node, NodeId, NodeKind, RedOp, Reduce, UnOp,
};
use std::collections::{BTreeMap, HashMap};

/// Every logsumexp whose softmax a later node computes, with its
/// exponentials shared (module doc).
pub fn softmax(g: &Graph, report: &mut Report) -> Graph {
    let wanted = wanted(g);
    if !wanted.iter().any(|w| *w) {
        return g.clone();
    }
    // By the rebuilt graph's id of each rewritten logsumexp.
    let mut shared: HashMap<NodeId, Shared> = HashMap::new();
    let mut old = 0;
    super::insert_before(g, report, "softmax", |out, node| {
        let at = old;
        old += 1;
        // Counted once per logsumexp, not per reader.
        reuse(node, &shared);
        let Some(lse) = Lse::of(node).filter(|_| wanted[at]) else {
            return false;
        };
        let s = lse.rewrite(out, node);
        shared.insert(NodeId(out.nodes.len() as u32), s);
        true
    })
}

/// The logsumexp facts the pass needs.
struct Lse {
    indices: Vec<IdxVar>,
    /// Its shape, the extents of `indices`.
    shape: Vec<Dim>,
    /// The reduced variable and its extent.
    var: IdxVar,
    extent: Dim,
    filter: Option<Expr>,
    body: Expr,
}

impl Lse {
    fn of(node: &Node) -> Option<Lse> {
        let NodeKind::Comp(c) = &node.kind else {
            return None;
        };
        let r = c.reduce.as_ref()?;
        let [(var, extent)] = &r.over[..] else {
            return None;
        };
        let ok = node.dtype == DType::Float
            && r.op == RedOp::LogSumExp
            && r.empty == f64::NEG_INFINITY
            && infallible(&c.body)
            && r.filter
                .as_ref()
                .is_none_or(|f| matches!(f, Expr::Read { .. }) && infallible(f));
        ok.then(|| Lse {
            indices: c.indices.clone(),
            shape: node.shape.clone(),
            var: *var,
            extent: extent.clone(),
            filter: r.filter.clone(),
            body: c.body.clone(),
        })
    }

    /// What its softmax looks like in a reader.
    fn pattern(&self) -> Pattern {
        let mut dims = self.shape.clone();
        dims.push(self.extent.clone());
        Pattern {
            vars: self.vars(),
            dims,
            body: self.body.clone(),
        }
    }

    /// The body's variables: the output indices, then the reduced one.
    fn vars(&self) -> Vec<IdxVar> {
        let mut v = self.indices.to_vec();
        v.push(self.var);
        v
    }

    /// `E`'s dims as positions into `vars`: the body's read order when it is
    /// a plain read of them all, else `vars`' own.
    fn layout(&self) -> Vec<usize> {
        let vars = self.vars();
        if let Expr::Read { at, .. } = &self.body {
            let pos: Vec<Option<usize>> = at
                .iter()
                .map(|e| match e {
                    Expr::Index(v) => vars.iter().position(|w| w == v),
                    _ => None,
                })
                .collect();
            let mut seen = vec![false; vars.len()];
            if pos.len() == vars.len()
                && pos
                    .iter()
                    .all(|p| p.is_some_and(|p| !std::mem::replace(&mut seen[p], true)))
            {
                return pos.into_iter().flatten().collect();
            }
        }
        (0..vars.len()).collect()
    }

    /// Pushes `M`, `E`, `S` and `Q` into `out` and makes `node` (this
    /// logsumexp) the value from them.
    fn rewrite(&self, out: &mut Graph, node: &mut Node) -> Shared {
        let name = node.name.clone().unwrap_or_else(|| "logsumexp".into());
        let vars = self.vars();
        let pattern = self.pattern();
        let layout = self.layout();
        let comp = |indices: Vec<IdxVar>, reduce: Option<Reduce>, body: Expr| {
            NodeKind::Comp(Comp {
                indices,
                reduce,
                body,
            })
        };
        let push = |out: &mut Graph, kind: NodeKind, shape: Vec<Dim>, suffix: &str| {
            out.push(Node {
                kind,
                dtype: DType::Float,
                shape,
                name: Some(format!("{name}.{suffix}")),
                span: node.span,
            })
        };
        let at = |vs: &[IdxVar]| vs.iter().map(|v| Expr::Index(*v)).collect::<Vec<_>>();
        let finite = |m: &Expr| {
            Expr::binary(
                BinOp::Eq,
                Expr::binary(BinOp::Sub, m.clone(), m.clone()),
                Expr::Float(0.0),
            )
        };

        // M: the largest value, NaN skipped, where the filter holds.
        let (fv, sub) = fresh(out, &vars);
        let f = self.body.subst(&sub);
        let real = Expr::binary(BinOp::Eq, f.clone(), f.clone());
        let keep = match &self.filter {
            Some(c) => Expr::Select(
                Box::new(c.subst(&sub)),
                Box::new(real),
                Box::new(Expr::Bool(false)),
            ),
            None => real,
        };
        let n = fv.len() - 1;
        // A reduction over the last of `fv`, its output over the others.
        let over_last = |fv: &[IdxVar], op: RedOp, filter: Option<Expr>, empty: f64, body: Expr| {
            comp(
                fv[..n].to_vec(),
                Some(Reduce {
                    op,
                    over: vec![(fv[n], self.extent.clone())],
                    filter,
                    empty,
                }),
                body,
            )
        };
        let max_node = over_last(&fv, RedOp::Max, Some(keep), f64::NEG_INFINITY, f);
        let max = push(out, max_node, node.shape.clone(), "max");

        // E: the shifted exponentials (0 where the filter fails).
        let (fv, sub) = fresh(out, &vars);
        let shifted = Expr::binary(
            BinOp::Sub,
            self.body.subst(&sub),
            Expr::read(max, at(&fv[..n])),
        );
        let mut e = Expr::unary(UnOp::Exp, shifted);
        if let Some(c) = &self.filter {
            e = Expr::Select(
                Box::new(c.subst(&sub)),
                Box::new(e),
                Box::new(Expr::Float(0.0)),
            );
        }
        let e_indices: Vec<IdxVar> = layout.iter().map(|p| fv[*p]).collect();
        let e_shape: Vec<Dim> = layout.iter().map(|p| pattern.dims[*p].clone()).collect();
        let exps = push(out, comp(e_indices, None, e), e_shape, "exp");

        // S: their sum, in the reduced variable's order.
        let (fv, _) = fresh(out, &vars);
        let e_at: Vec<Expr> = layout.iter().map(|p| Expr::Index(fv[*p])).collect();
        let sum_node = over_last(
            &fv,
            RedOp::Sum,
            None,
            RedOp::Sum.identity(),
            Expr::read(exps, e_at),
        );
        let sum = push(out, sum_node, node.shape.clone(), "sum");

        // Q: the softmax's factor, 1 where the shift is no number.
        let (fv, _) = fresh(out, &vars[..n]);
        let (m, s) = (Expr::read(max, at(&fv)), Expr::read(sum, at(&fv)));
        let q = Expr::Select(
            Box::new(finite(&m)),
            Box::new(Expr::binary(BinOp::Div, Expr::Float(1.0), s)),
            Box::new(Expr::Float(1.0)),
        );
        let inv = push(out, comp(fv.clone(), None, q), node.shape.clone(), "inv");

        // L itself from them.
        let (m, s) = (Expr::read(max, at(&fv)), Expr::read(sum, at(&fv)));
        let value = Expr::Select(
            Box::new(finite(&m)),
            Box::new(Expr::binary(
                BinOp::Add,
                m.clone(),
                Expr::unary(UnOp::Log, s),
            )),
            Box::new(m),
        );
        node.kind = comp(fv, None, value);

        Shared {
            pattern,
            layout,
            exps,
            inv,
        }
    }
}

/// Fresh copies of `vars` (same names) and the substitution to them.
fn fresh(out: &mut Graph, vars: &[IdxVar]) -> (Vec<IdxVar>, BTreeMap<IdxVar, Expr>) {
    let mut fv = Vec::with_capacity(vars.len());
    let mut sub = BTreeMap::new();
    for v in vars {
        let name = out.index_name(*v).to_string();
        let w = out.new_index(&name);
        fv.push(w);
        sub.insert(*v, Expr::Index(w));
    }
    (fv, sub)
}

/// What a softmax of a logsumexp looks like in a reader: the body at the
/// reader's own loop variables.
struct Pattern {
    /// The body's variables (output indices, then the reduced one), their
    /// extents, and the body.
    vars: Vec<IdxVar>,
    dims: Vec<Dim>,
    body: Expr,
}

impl Pattern {
    /// For `exp(g - L[at])` read at loop levels `levels`: the expression of
    /// each of `vars` there, when `g` is the body at those and each is a
    /// loop variable of the reader over the same extent (so `E` is read in
    /// range).
    fn sigma(&self, g: &Expr, at: &[Expr], levels: &[(IdxVar, Dim)]) -> Option<Vec<Expr>> {
        let n = self.vars.len() - 1;
        let mut sigma: Vec<Option<Expr>> = at.iter().cloned().map(Some).collect();
        sigma.push(None);
        if at.len() != n || !unify(&self.body, g, &self.vars, &mut sigma) {
            return None;
        }
        let sigma: Vec<Expr> = sigma.into_iter().collect::<Option<_>>()?;
        let in_range = sigma.iter().zip(&self.dims).all(|(e, d)| match e {
            Expr::Index(w) => levels.iter().any(|(v, x)| v == w && x == d),
            _ => false,
        });
        in_range.then_some(sigma)
    }
}

/// A rewritten logsumexp: what its readers' softmax becomes.
struct Shared {
    pattern: Pattern,
    /// `E`'s dims as positions into the pattern's `vars`.
    layout: Vec<usize>,
    exps: NodeId,
    inv: NodeId,
}

impl Shared {
    /// `E[..] * Q[..]` for `exp(g - L[at])` read at loop levels `levels`,
    /// where `g` is the body there (module doc).
    fn reuse(&self, g: &Expr, at: &[Expr], levels: &[(IdxVar, Dim)]) -> Option<Expr> {
        let sigma = self.pattern.sigma(g, at, levels)?;
        let e_at = self.layout.iter().map(|p| sigma[*p].clone()).collect();
        Some(Expr::binary(
            BinOp::Mul,
            Expr::read(self.exps, e_at),
            Expr::read(self.inv, sigma[..at.len()].to_vec()),
        ))
    }
}

/// Whether `g` is `f` with each of `vars` replaced by `sigma`'s expression
/// for it, filling the positions `sigma` leaves open.
fn unify(f: &Expr, g: &Expr, vars: &[IdxVar], sigma: &mut [Option<Expr>]) -> bool {
    match (f, g) {
        (Expr::Index(v), _) if vars.contains(v) => {
            let p = vars.iter().position(|w| w == v).expect("contained");
            match &sigma[p] {
                Some(e) => e == g,
                None => {
                    sigma[p] = Some(g.clone());
                    true
                }
            }
        }
        (Expr::Float(a), Expr::Float(b)) => a.to_bits() == b.to_bits(),
        (Expr::Read { node: a, at: x }, Expr::Read { node: b, at: y }) => {
            a == b && x.len() == y.len() && x.iter().zip(y).all(|(x, y)| unify(x, y, vars, sigma))
        }
        (Expr::Unary(p, a), Expr::Unary(q, b)) => p == q && unify(a, b, vars, sigma),
        (Expr::Binary(p, a, b), Expr::Binary(q, c, d)) => {
            p == q && unify(a, c, vars, sigma) && unify(b, d, vars, sigma)
        }
        (Expr::Select(a, b, c), Expr::Select(x, y, z)) => {
            unify(a, x, vars, sigma) && unify(b, y, vars, sigma) && unify(c, z, vars, sigma)
        }
        (Expr::Unary(..) | Expr::Binary(..) | Expr::Select(..) | Expr::Read { .. }, _) => false,
        _ => f == g,
    }
}

/// Calls `found(lse, g, at)` for every `exp(g - lse[at])` in `e`.
fn softmaxes(e: &Expr, found: &mut impl FnMut(NodeId, &Expr, &[Expr])) {
    e.walk(&mut |x| {
        if let Expr::Unary(UnOp::Exp, d) = x {
            if let Expr::Binary(BinOp::Sub, g, l) = d.as_ref() {
                if let Expr::Read { node, at } = l.as_ref() {
                    found(*node, g, at);
                }
            }
        }
    });
}

/// The expressions of a comprehension: its body and its filter.
fn exprs(c: &Comp) -> impl Iterator<Item = &Expr> {
    std::iter::once(&c.body).chain(c.reduce.as_ref().and_then(|r| r.filter.as_ref()))
}

/// Which nodes of `g` are logsumexps the pass rewrites: those with a later
/// node computing their softmax where `reuse` would take it.
fn wanted(g: &Graph) -> Vec<bool> {
    let mut wanted = vec![false; g.nodes.len()];
    let patterns: Vec<Option<Pattern>> = g
        .nodes
        .iter()
        .map(|n| Lse::of(n).map(|l| l.pattern()))
        .collect();
    for node in &g.nodes {
        let NodeKind::Comp(c) = &node.kind else {
            continue;
        };
        let levels = c.levels(&node.shape);
        for e in exprs(c) {
            softmaxes(e, &mut |lse, g, at| {
                if let Some(p) = &patterns[lse.index()] {
                    if p.sigma(g, at, &levels).is_some() {
                        wanted[lse.index()] = true;
                    }
                }
            });
        }
    }
    wanted
}

/// Rewrites the softmaxes of rewritten logsumexps in `node`.
fn reuse(node: &mut Node, shared: &HashMap<NodeId, Shared>) {
    if shared.is_empty() {
        return;
    }
    let shape = node.shape.clone();
    let NodeKind::Comp(c) = &mut node.kind else {
        return;
    };
    let levels = c.levels(&shape);
    let rewrite = |e: &Expr| {
        e.map(&mut |x| {
            if let Expr::Unary(UnOp::Exp, d) = &x {
                if let Expr::Binary(BinOp::Sub, g, l) = d.as_ref() {
                    if let Expr::Read { node, at } = l.as_ref() {
                        if let Some(r) = shared.get(node).and_then(|s| s.reuse(g, at, &levels)) {
                            return r;
                        }
                    }
                }
            }
            x
        })
    };
    c.body = rewrite(&c.body);
    if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
        *f = rewrite(f);
    }
}
