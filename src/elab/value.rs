//! Values during elaboration, and the operations that build IR from them:
//! referencing a node, materialising a `Val` as a node, broadcasting.

use super::{Elab, Reported, Static, R};
use crate::ir::{self, DType, Dim, Expr, IdxVar, Node, NodeId, NodeKind};
use crate::syntax::{codes, Diagnostic, FileId, Span};
use std::collections::BTreeMap;

/// What a name stands for.
#[derive(Clone, Debug)]
pub(crate) enum Binding {
    Static(Static),
    /// A materialised tensor; every reference gets fresh axes.
    Node(NodeId),
    /// A tensor expression (function parameters, lets inside functions).
    Val(Val),
    Index(IdxVar),
    Func(FileId, String),
    /// A dim bound by a function parameter's type (`fn f(x: [D])`).
    Dim(Dim),
    /// An optional input that was not given.
    Absent(Span),
    Lambda(Box<super::wrap::Lambda>),
    Tensors(Vec<Val>),
    /// A definition whose elaboration already reported an error: its uses
    /// fail quietly, so one mistake is not also reported as "unknown name".
    Failed,
}

/// The value of an expression.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Static(Static),
    Tensor(Val),
    /// A function, by module and name (or a builtin: module `None`).
    Func(Option<FileId>, String),
    /// An unbound bare name: legal only as an enum choice in a comparison.
    Symbol(String, Span),
    /// A function value `x => ...`.
    Lambda(Box<super::wrap::Lambda>),
    /// Several tensors (`embeddings(loss)`), to unroll over.
    Tensors(Vec<Val>),
}

/// The value a binding stands for (tensors are not refreshed).
pub(crate) fn value_of(b: Binding) -> Value {
    match b {
        Binding::Static(s) => Value::Static(s),
        Binding::Val(v) => Value::Tensor(v),
        Binding::Func(m, n) => Value::Func(Some(m), n),
        Binding::Lambda(l) => Value::Lambda(l),
        Binding::Tensors(ts) => Value::Tensors(ts),
        _ => Value::Static(Static::Null),
    }
}

pub(crate) fn binding_of(v: Value) -> Binding {
    match v {
        Value::Static(s) => Binding::Static(s),
        Value::Tensor(t) => Binding::Val(t),
        Value::Func(Some(m), n) => Binding::Func(m, n),
        Value::Func(None, n) => Binding::Static(Static::Func(n)),
        Value::Symbol(s, _) => Binding::Static(Static::Str(s)),
        Value::Lambda(l) => Binding::Lambda(l),
        Value::Tensors(ts) => Binding::Tensors(ts),
    }
}

/// A tensor expression: `expr` evaluated at the enclosing index variables and
/// at this value's own `axes` (one per dim of its shape, in order).
#[derive(Clone, Debug)]
pub(crate) struct Val {
    pub expr: Expr,
    pub ty: DType,
    pub axes: Vec<(IdxVar, Dim)>,
}

impl Val {
    pub fn scalar(expr: Expr, ty: DType) -> Val {
        Val {
            expr,
            ty,
            axes: vec![],
        }
    }

    pub fn shape(&self) -> Vec<Dim> {
        self.axes.iter().map(|a| a.1.clone()).collect()
    }
}

/// A name for the axis variable of a dim: `B` → `b`, others → `t`.
fn axis_name(d: &Dim) -> String {
    match d.as_sym() {
        Some(s) => s.to_lowercase(),
        None => "t".into(),
    }
}

impl Elab<'_> {
    pub(crate) fn fresh_axis(&mut self, d: &Dim) -> IdxVar {
        let v = self.graph.new_index(&axis_name(d));
        self.extents.insert(v, d.clone());
        v
    }

    /// A reference to a whole node, with fresh axes.
    pub(crate) fn node_val(&mut self, id: NodeId) -> Val {
        let node = self.graph.node(id).clone();
        let axes: Vec<(IdxVar, Dim)> = node
            .shape
            .iter()
            .map(|d| (self.fresh_axis(d), d.clone()))
            .collect();
        let at = axes.iter().map(|(v, _)| Expr::Index(*v)).collect();
        Val {
            expr: Expr::read(id, at),
            ty: node.dtype,
            axes,
        }
    }

    /// The same tensor expression with its axes renamed apart.
    pub(crate) fn refresh(&mut self, v: &Val) -> Val {
        let mut map = BTreeMap::new();
        let mut axes = Vec::new();
        for (a, d) in &v.axes {
            let n = self.fresh_axis(d);
            map.insert(*a, Expr::Index(n));
            axes.push((n, d.clone()));
        }
        Val {
            expr: v.expr.subst(&map),
            ty: v.ty,
            axes,
        }
    }

    /// Lifts a value to a tensor expression (numbers and bools become constants).
    pub(crate) fn to_val(&mut self, v: Value, span: Span) -> R<Val> {
        match v {
            Value::Tensor(t) => Ok(t),
            Value::Static(Static::Float(x)) => Ok(Val::scalar(Expr::Float(x), DType::Float)),
            Value::Static(Static::Int(n)) => Ok(Val::scalar(Expr::Int(n), DType::Int)),
            Value::Static(Static::Bool(b)) => Ok(Val::scalar(Expr::Bool(b), DType::Bool)),
            Value::Static(s) => Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("expected a tensor or number, found {} ({s})", s.describe()),
                )
                .at(span, "not a number"),
            )),
            Value::Func(_, name) => Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("`{name}` is a function, not a value"),
                )
                .at(span, "call it: `f(x)`"),
            )),
            Value::Symbol(name, s) => Err(self.unknown_name(&name, s)),
            Value::Lambda(_) | Value::Tensors(_) => Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    "a function or a list of tensors is not a value here",
                )
                .at(span, "not a tensor or number"),
            )),
        }
    }

    /// The index variables of `expr` that are not `axes`, in scope order.
    /// Any other free variable is an internal error.
    pub(crate) fn ambient_used(&self, exprs: &[&Expr], axes: &[(IdxVar, Dim)]) -> Vec<IdxVar> {
        let mut used = Vec::new();
        for e in exprs {
            for v in e.vars() {
                if !axes.iter().any(|a| a.0 == v) && !used.contains(&v) {
                    used.push(v);
                }
            }
        }
        let ordered: Vec<IdxVar> = self
            .ambient
            .iter()
            .copied()
            .filter(|v| used.contains(v))
            .collect();
        assert_eq!(
            ordered.len(),
            used.len(),
            "internal error: index variable escaped its scope"
        );
        ordered
    }

    pub(crate) fn extent_of(&mut self, v: IdxVar, span: Span) -> R<Dim> {
        match self.extents.get(&v) {
            Some(d) => Ok(d.clone()),
            None => {
                let name = self.graph.index_name(v).to_string();
                Err(self.error(
                    Diagnostic::error(
                        codes::UNKNOWN_EXTENT,
                        format!("cannot tell what range the index `{name}` runs over"),
                    )
                    .at(
                        span,
                        format!("`{name}` is not used to index any tensor here"),
                    )
                    .with_help(format!(
                        "use `{name}` to index a tensor, or give its range: `{name}: B`"
                    )),
                ))
            }
        }
    }

    /// Builds a comprehension node for `val` (plus an optional reduction),
    /// indexed by the enclosing variables it uses and then its own axes, and
    /// returns the value that reads it back.
    pub(crate) fn build_comp(
        &mut self,
        body: Val,
        reduce: Option<ir::Reduce>,
        dtype: DType,
        name: Option<String>,
        span: Span,
    ) -> R<Val> {
        let filter = reduce.as_ref().and_then(|r| r.filter.clone());
        let over: Vec<(IdxVar, Dim)> = reduce.as_ref().map_or(vec![], |r| r.over.clone());
        let mut bound = body.axes.clone();
        bound.extend(over.iter().cloned());
        let mut exprs = vec![&body.expr];
        if let Some(f) = &filter {
            exprs.push(f);
        }
        let used = self.ambient_used(&exprs, &bound);
        let mut indices = Vec::new();
        let mut shape = Vec::new();
        for v in &used {
            shape.push(self.extent_of(*v, span)?);
            indices.push(*v);
        }
        for (a, d) in &body.axes {
            indices.push(*a);
            shape.push(d.clone());
        }
        let node = Node {
            kind: NodeKind::Comp(ir::Comp {
                indices: indices.clone(),
                reduce,
                body: body.expr,
            }),
            dtype,
            shape,
            name,
            span: Some(span),
        };
        let id = self.graph.push(node);
        let at = indices.iter().map(|v| Expr::Index(*v)).collect();
        Ok(Val {
            expr: Expr::read(id, at),
            ty: dtype,
            axes: body.axes,
        })
    }

    /// Materialises a value as a node of its own (reusing the node it already
    /// is, when it is a plain read of one).
    pub(crate) fn materialize_named(
        &mut self,
        v: Val,
        name: Option<String>,
        span: Span,
    ) -> R<NodeId> {
        if !self.ambient_used(&[&v.expr], &v.axes).is_empty() {
            panic!("internal error: materialize_named with enclosing indices");
        }
        if let Some(id) = self.plain_read(&v, &[]) {
            if name.is_some() && self.graph.nodes[id.index()].name.is_none() {
                self.graph.nodes[id.index()].name = name;
            }
            return Ok(id);
        }
        let ty = v.ty;
        let out = self.build_comp(v, None, ty, name, span)?;
        match out.expr {
            Expr::Read { node, .. } => Ok(node),
            _ => unreachable!("build_comp returns a read"),
        }
    }

    /// Materialises a value as a node indexed by the enclosing variables it uses
    /// (`prefix`) and then its axes. Returns the node and the prefix.
    pub(crate) fn materialize_in_scope(
        &mut self,
        v: Val,
        span: Span,
        prefix: &[IdxVar],
    ) -> R<NodeId> {
        let prefix_vals: Vec<Expr> = prefix.iter().map(|p| Expr::Index(*p)).collect();
        if let Some(id) = self.plain_read(&v, &prefix_vals) {
            return Ok(id);
        }
        // Force the node to be indexed by the whole prefix, even where the value
        // does not depend on a prefix variable (a broadcast).
        let mut body = v.clone();
        let mut axes = Vec::new();
        for p in prefix {
            let d = self.extent_of(*p, span)?;
            axes.push((*p, d));
        }
        axes.extend(v.axes.iter().cloned());
        body.axes = axes;
        let saved = std::mem::take(&mut self.ambient);
        let ty = body.ty;
        let out = self.build_comp(body, None, ty, None, span);
        self.ambient = saved;
        match out?.expr {
            Expr::Read { node, .. } => Ok(node),
            _ => unreachable!("build_comp returns a read"),
        }
    }

    /// `Some(node)` if `v` is exactly `node[prefix..., axes...]`.
    fn plain_read(&self, v: &Val, prefix: &[Expr]) -> Option<NodeId> {
        let Expr::Read { node, at } = &v.expr else {
            return None;
        };
        let expected: Vec<Expr> = prefix
            .iter()
            .cloned()
            .chain(v.axes.iter().map(|(a, _)| Expr::Index(*a)))
            .collect();
        // Same variables in the same order *and* the same extents: a slice
        // `w[:, 0:4]` reads w at its own variables but is not w.
        let shape = &self.graph.node(*node).shape;
        let same_extents = shape.len() == expected.len()
            && shape[prefix.len()..]
                .iter()
                .zip(&v.axes)
                .all(|(d, (_, e))| d == e);
        (at == &expected && same_extents).then_some(*node)
    }

    /// Aligns the axes of two values from the right (numpy broadcasting, with
    /// equal dims only) and renames `b`'s aligned axes to `a`'s.
    pub(crate) fn broadcast(
        &mut self,
        a: Val,
        b: Val,
        span: Span,
    ) -> R<(Val, Val, Vec<(IdxVar, Dim)>)> {
        let (na, nb) = (a.axes.len(), b.axes.len());
        let n = na.max(nb);
        let mut map = BTreeMap::new();
        let mut axes = Vec::new();
        for k in 0..n {
            // k counts from the left of the longer shape.
            let ia = (k + na).checked_sub(n);
            let ib = (k + nb).checked_sub(n);
            match (ia, ib) {
                (Some(ia), Some(ib)) => {
                    let (va, da) = a.axes[ia].clone();
                    let (vb, db) = b.axes[ib].clone();
                    if da != db {
                        let (sa, sb) = (
                            ir::dim::shape_string(&a.shape()),
                            ir::dim::shape_string(&b.shape()),
                        );
                        return Err(self.error(
                            Diagnostic::error(codes::SHAPE_MISMATCH, format!("shapes {sa} and {sb} do not match"))
                                .at(span, format!("{da} vs {db}"))
                                .with_help("elementwise operations need equal dims, aligned from the right; index the operands to say how they pair"),
                        ));
                    }
                    map.insert(vb, Expr::Index(va));
                    axes.push((va, da));
                }
                (Some(ia), None) => axes.push(a.axes[ia].clone()),
                (None, Some(ib)) => axes.push(b.axes[ib].clone()),
                (None, None) => unreachable!(),
            }
        }
        let b = Val {
            expr: b.expr.subst(&map),
            ty: b.ty,
            axes: vec![],
        };
        let a = Val { axes: vec![], ..a };
        Ok((a, b, axes))
    }

    pub(crate) fn unknown_name(&mut self, name: &str, span: Span) -> Reported {
        let mut candidates: Vec<String> =
            self.scopes.iter().flat_map(|s| s.keys().cloned()).collect();
        candidates.extend(self.program.visible_fns(self.module));
        candidates.extend(self.dims.iter().cloned());
        candidates.extend(super::expr::BUILTINS.iter().map(|s| s.to_string()));
        let close = closest(name, &candidates);
        if self.closed_indices.iter().any(|n| n == name) {
            return self.error(
                Diagnostic::error(codes::UNKNOWN_NAME, format!("the index `{name}` is not in scope here"))
                    .at(span, "its reduction ended before this")
                    .with_help(format!("a reduction's body extends over a product, not over `+`, `-` or a comparison: `sum({name}) a[{name}] + b[{name}]` is `(sum({name}) a[{name}]) + b[{name}]`; parenthesise the body: `sum({name}) (a[{name}] + b[{name}])`")),
            );
        }
        let mut d = Diagnostic::error(codes::UNKNOWN_NAME, format!("unknown name `{name}`"))
            .at(span, "not defined");
        let module = self.program.module(self.module);
        if let Some(broken) = module
            .uses
            .iter()
            .find(|u| !self.program.module(**u).parsed)
        {
            // Its declarations are lost to the syntax error reported there.
            let file = &self.program.sources.get(*broken).name;
            d = d.with_help(format!(
                "it may be declared in {file}, which does not parse"
            ));
        } else if let Some(c) = close {
            d = d.with_help(format!("did you mean `{c}`?"));
        } else {
            d = d.with_help("names are inputs, parameters, `let`s, index variables, dims, functions (yours and the prelude's) and builtins");
        }
        self.error(d)
    }
}

/// The candidate closest to `name` by edit distance, if close enough.
pub(crate) fn closest(name: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, c)| *d <= 2.max(name.len() / 4) && *d < c.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}
