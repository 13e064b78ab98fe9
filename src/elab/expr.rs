//! Elaboration of expressions: names, indexing, calls and inlining,
//! arithmetic with broadcasting and type promotion, static `if`/`match`, and
//! reductions (each its own comprehension node).

use super::value::{closest, Binding, Val, Value};
use super::{Elab, Reported, Static, R};
use crate::ir::{self, BinOp as IB, DType, Dim, Expr, IdxVar, UnOp as IU};
use crate::syntax::ast::{self, Arg, BinOp, ExprKind, IndexItem, RedOp, UnOp};
use crate::syntax::{codes, Diagnostic, Span};
use std::collections::{BTreeMap, HashMap};

/// Builtin functions and constants (besides the unary math functions).
pub(crate) const BUILTINS: &[&str] = &[
    "exp",
    "log",
    "sqrt",
    "abs",
    "relu",
    "softplus",
    "sigmoid",
    "log_sigmoid",
    "tanh",
    "detach",
    "float",
    "maximum",
    "minimum",
    "clamp",
    "present",
    "form",
    "range",
    "sample",
    "truncate",
    "embeddings",
    "normalize_rows",
    "flatten_rows",
    "clamp_min",
    "clamp_max",
    "concat",
    "flatten",
    "stack",
    "transpose",
    "arange",
    "eye",
    "len",
    "size",
    "inf",
    "pi",
];

impl Elab<'_> {
    pub(crate) fn expr(&mut self, e: &ast::Expr) -> R<Value> {
        let span = e.span;
        match &e.kind {
            ExprKind::Float(x) => Ok(Value::Static(Static::Float(*x))),
            ExprKind::Int(n) => Ok(Value::Static(Static::Int(*n))),
            ExprKind::Bool(b) => Ok(Value::Static(Static::Bool(*b))),
            ExprKind::Null => Ok(Value::Static(Static::Null)),
            ExprKind::Str(s) => Ok(Value::Static(Static::Str(s.clone()))),
            ExprKind::Name(n) => self.name(n, span),
            ExprKind::List(items) => {
                let mut out = Vec::new();
                for item in items {
                    match self.expr(item)? {
                        Value::Static(s) => out.push(s),
                        Value::Symbol(s, _) => out.push(Static::Str(s)),
                        _ => {
                            return Err(self.error(
                                Diagnostic::error(
                                    codes::NOT_STATIC,
                                    "list literals hold parameters and constants",
                                )
                                .at(item.span, "a tensor")
                                .with_help("to join tensors use `concat(a, b)` or `stack(a, b)`"),
                            ))
                        }
                    }
                }
                Ok(Value::Static(Static::List(out)))
            }
            ExprKind::Index { base, items } => {
                let b = self.expr(base)?;
                self.index(b, items, base.span, span)
            }
            ExprKind::Call { callee, args } => self.call(callee, args, span),
            ExprKind::Unary { op, operand } => {
                let v = self.expr(operand)?;
                self.unary(*op, v, span)
            }
            ExprKind::Binary { op, lhs, rhs } => {
                let a = self.expr(lhs)?;
                // `and`/`or` on a parameter condition short-circuit, so that
                // `w == null or len(w) == n` is fine when w is null.
                match (op, &a) {
                    (BinOp::Or, Value::Static(Static::Bool(true))) => return Ok(a),
                    (BinOp::And, Value::Static(Static::Bool(false))) => return Ok(a),
                    _ => {}
                }
                let b = self.expr(rhs)?;
                self.binary(*op, a, b, lhs.span, rhs.span, span)
            }
            ExprKind::If {
                cond,
                then,
                otherwise,
            } => self.if_expr(cond, then, otherwise, span),
            ExprKind::Match { scrutinee, arms } => self.match_expr(scrutinee, arms, span),
            ExprKind::Lambda { param, body } => Ok(Value::Lambda(Box::new(super::wrap::Lambda {
                param: param.name.clone(),
                body: body.as_ref().clone(),
                scopes: self.scopes.clone(),
                module: self.module,
            }))),
            ExprKind::Reduce {
                op,
                binders,
                filter,
                default,
                body,
            } => self.reduce(
                *op,
                binders,
                filter.as_deref(),
                default.as_deref(),
                body.as_deref(),
                span,
            ),
        }
    }

    fn name(&mut self, n: &str, span: Span) -> R<Value> {
        if let Some(b) = self.lookup(n).cloned() {
            return Ok(match b {
                Binding::Static(Static::Func(f)) => match self.program.find_fn(self.module, &f) {
                    Some((m, _)) => Value::Func(Some(m), f),
                    None => Value::Func(None, f),
                },
                Binding::Static(s) => Value::Static(s),
                Binding::Node(id) => Value::Tensor(self.node_val(id)),
                Binding::Val(v) => Value::Tensor(self.refresh(&v)),
                Binding::Index(v) => Value::Tensor(Val::scalar(Expr::Index(v), DType::Int)),
                Binding::Func(m, f) => Value::Func(Some(m), f),
                Binding::Dim(d) => Value::Tensor(Val::scalar(dim_value(&d), DType::Int)),
                Binding::Failed => return Err(Reported),
                Binding::Lambda(l) => Value::Lambda(l),
                Binding::Tensors(ts) => Value::Tensors(ts),
                Binding::Absent(decl) => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::MISSING_TENSOR,
                            format!("the optional input `{n}` is absent here"),
                        )
                        .at(span, "used while absent")
                        .with_related(decl, "declared optional here")
                        .with_help(format!(
                            "guard the use with `if present({n}) then ... else ...`"
                        )),
                    ))
                }
            });
        }
        if self.dims.iter().any(|d| d == n) {
            return Ok(Value::Tensor(Val::scalar(
                Expr::Size(Dim::sym(n)),
                DType::Int,
            )));
        }
        if let Some((m, _)) = self.program.find_fn(self.module, n) {
            return Ok(Value::Func(Some(m), n.to_string()));
        }
        match n {
            "inf" => return Ok(Value::Static(Static::Float(f64::INFINITY))),
            "pi" => return Ok(Value::Static(Static::Float(std::f64::consts::PI))),
            _ => {}
        }
        if BUILTINS.contains(&n) {
            return Ok(Value::Func(None, n.to_string()));
        }
        Ok(Value::Symbol(n.to_string(), span))
    }

    /// `x[i, j]`, `x[i]` (leading axes), `x[:, a:b]`, `s[i, labels[i]]`.
    fn index(&mut self, base: Value, items: &[IndexItem], base_span: Span, span: Span) -> R<Value> {
        let base = match base {
            Value::Static(Static::List(list)) => return self.index_list(list, items, span),
            other => self.to_val(other, base_span)?,
        };
        if items.len() > base.axes.len() {
            return Err(self.error(
                Diagnostic::error(
                    codes::INDEX_COUNT,
                    format!(
                        "{} indices for a tensor of rank {}",
                        items.len(),
                        base.axes.len()
                    ),
                )
                .at(
                    span,
                    format!("shape {}", ir::dim::shape_string(&base.shape())),
                )
                .with_help("give at most one index per dim"),
            ));
        }
        let mut map = BTreeMap::new();
        let mut axes = Vec::new();
        for (k, item) in items.iter().enumerate() {
            let (axis_var, dim) = base.axes[k].clone();
            match item {
                IndexItem::At(ix) => {
                    let (e, extra) = self.index_expr(ix, &dim)?;
                    map.insert(axis_var, e);
                    axes.extend(extra);
                }
                IndexItem::Slice { start, end, span } => {
                    let s = match start {
                        Some(s) => self.static_dim(s)?,
                        None => Dim::lit(0),
                    };
                    let e = match end {
                        Some(e) => self.static_dim(e)?,
                        None => dim.clone(),
                    };
                    if let (Some(sv), Some(ev), dv) = (s.as_lit(), e.as_lit(), dim.as_lit()) {
                        if sv < 0 || ev < sv || dv.is_some_and(|d| ev > d) {
                            return Err(self.error(
                                Diagnostic::error(
                                    codes::BAD_INDEX,
                                    format!("slice {sv}:{ev} is outside the dim {dim}"),
                                )
                                .at(*span, "out of range"),
                            ));
                        }
                    }
                    let len = e.sub(&s);
                    let v = self.fresh_axis(&len);
                    let at = if s == Dim::lit(0) {
                        Expr::Index(v)
                    } else {
                        Expr::binary(IB::Add, Expr::Index(v), dim_value(&s))
                    };
                    map.insert(axis_var, at);
                    axes.push((v, len));
                }
            }
        }
        axes.extend(base.axes[items.len()..].iter().cloned());
        Ok(Value::Tensor(Val {
            expr: base.expr.subst(&map),
            ty: base.ty,
            axes,
        }))
    }

    /// One index: an index variable (its range is the dim, checked or
    /// inferred), or an int expression (a gather, checked at run time).
    fn index_expr(&mut self, ix: &ast::Expr, dim: &Dim) -> R<(Expr, Vec<(IdxVar, Dim)>)> {
        let v = self.expr(ix)?;
        let v = self.to_val(v, ix.span)?;
        if v.ty != DType::Int {
            return Err(self.error(
                Diagnostic::error(codes::TYPE_MISMATCH, format!("an index must be an int, this is a {}", v.ty.name()))
                    .at(ix.span, "not an int")
                    .with_help("index with index variables (`x[i]`), int constants or int tensors (`s[i, labels[i]]`)"),
            ));
        }
        if let Expr::Index(var) = v.expr {
            if v.axes.is_empty() {
                match self.extents.get(&var).cloned() {
                    None => {
                        self.extents.insert(var, dim.clone());
                    }
                    Some(d) if &d == dim => {}
                    // A shorter range may index a longer dim (`qd[i, i]` with i < B <= N).
                    Some(d) if dim.sub(&d).is_non_negative() => {}
                    Some(d) => {
                        let name = self.graph.index_name(var).to_string();
                        return Err(self.error(
                            Diagnostic::error(codes::SHAPE_MISMATCH, format!("the index `{name}` runs over {d}, but indexes a dim of size {dim} here"))
                                .at(ix.span, format!("a dim of size {dim}"))
                                .with_help("an index variable ranges over one size; use another variable for the other dim"),
                        ));
                    }
                }
            }
        }
        if let (Expr::Int(n), Some(d)) = (&v.expr, dim.as_lit()) {
            if *n < 0 || *n >= d {
                return Err(self.error(
                    Diagnostic::error(
                        codes::BAD_INDEX,
                        format!("index {n} is out of range for a dim of size {d}"),
                    )
                    .at(ix.span, "out of range"),
                ));
            }
        }
        Ok((v.expr, v.axes))
    }

    fn index_list(&mut self, list: Vec<Static>, items: &[IndexItem], span: Span) -> R<Value> {
        if let [IndexItem::At(ix)] = items {
            if let Value::Static(Static::Int(n)) = self.expr(ix)? {
                if n >= 0 && (n as usize) < list.len() {
                    return Ok(Value::Static(list[n as usize].clone()));
                }
                return Err(self.error(
                    Diagnostic::error(
                        codes::BAD_INDEX,
                        format!("index {n} is outside a list of {} elements", list.len()),
                    )
                    .at(ix.span, "out of range"),
                ));
            }
        }
        Err(self.error(
            Diagnostic::error(
                codes::NOT_STATIC,
                "a parameter list is indexed by an int constant",
            )
            .at(span, "here")
            .with_help("to loop over a list, reduce over it: `sum(d in dims) ...`"),
        ))
    }

    /// A slice bound: an int parameter, literal, dim name or sum of those.
    fn static_dim(&mut self, e: &ast::Expr) -> R<Dim> {
        let v = self.expr(e)?;
        if let Value::Symbol(name, s) = &v {
            return Err(self.unknown_name(name, *s));
        }
        match static_dim_of(&v) {
            Some(d) => Ok(d),
            None => Err(self.error(
                Diagnostic::error(
                    codes::NOT_STATIC,
                    "a slice bound must be known when the loss is compiled",
                )
                .at(e.span, "not a constant or dim")
                .with_help("use int parameters, literals or dim names"),
            )),
        }
    }

    fn unary(&mut self, op: UnOp, v: Value, span: Span) -> R<Value> {
        match (op, v) {
            (UnOp::Neg, Value::Static(Static::Float(x))) => Ok(Value::Static(Static::Float(-x))),
            (UnOp::Neg, Value::Static(Static::Int(n))) => Ok(Value::Static(Static::Int(-n))),
            (UnOp::Not, Value::Static(Static::Bool(b))) => Ok(Value::Static(Static::Bool(!b))),
            (op, v) => {
                let v = self.to_val(v, span)?;
                match (op, v.ty) {
                    (UnOp::Neg, DType::Bool)
                    | (UnOp::Not, DType::Float)
                    | (UnOp::Not, DType::Int) => {
                        let what = if op == UnOp::Neg {
                            "`-` needs a number"
                        } else {
                            "`not` needs a condition"
                        };
                        Err(self.error(
                            Diagnostic::error(
                                codes::TYPE_MISMATCH,
                                format!("{what}, found a {}", v.ty.name()),
                            )
                            .at(span, "here"),
                        ))
                    }
                    (UnOp::Neg, _) => Ok(Value::Tensor(Val {
                        expr: Expr::unary(IU::Neg, v.expr),
                        ..v
                    })),
                    (UnOp::Not, _) => Ok(Value::Tensor(Val {
                        expr: Expr::unary(IU::Not, v.expr),
                        ..v
                    })),
                }
            }
        }
    }

    pub(crate) fn binary(
        &mut self,
        op: BinOp,
        a: Value,
        b: Value,
        sa: Span,
        sb: Span,
        span: Span,
    ) -> R<Value> {
        if op == BinOp::In {
            return self.membership(a, b, sa, sb, span);
        }
        if let Some(v) = self.fold_static(op, &a, &b, sa, sb, span)? {
            return Ok(Value::Static(v));
        }
        if let Some(v) = identity_operand(op, &a, &b) {
            return Ok(v);
        }
        let a = self.to_val(a, sa)?;
        let b = self.to_val(b, sb)?;
        let (a, b, axes) = self.broadcast(a, b, span)?;
        let (ea, eb, ty) = self.promote(op, a, b, span)?;
        let irop = match op {
            BinOp::Add => IB::Add,
            BinOp::Sub => IB::Sub,
            BinOp::Mul => IB::Mul,
            BinOp::Div => IB::Div,
            BinOp::Rem => IB::Rem,
            BinOp::FloorDiv => IB::FloorDiv,
            BinOp::Pow => IB::Pow,
            BinOp::Eq => IB::Eq,
            BinOp::Ne => IB::Ne,
            BinOp::Lt => IB::Lt,
            BinOp::Le => IB::Le,
            BinOp::Gt => IB::Gt,
            BinOp::Ge => IB::Ge,
            BinOp::And => IB::And,
            BinOp::Or => IB::Or,
            BinOp::In => unreachable!(),
        };
        Ok(Value::Tensor(Val {
            expr: Expr::binary(irop, ea, eb),
            ty,
            axes,
        }))
    }

    /// Type rules: arithmetic on numbers (int with float → float; `/` and `^`
    /// always float), comparisons on like types, `and`/`or` on bools.
    fn promote(&mut self, op: BinOp, a: Val, b: Val, span: Span) -> R<(Expr, Expr, DType)> {
        use DType::*;
        let bad = |el: &mut Self, what: &str| {
            Err(el.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!(
                        "`{}` {what}, found {} and {}",
                        op.symbol(),
                        a.ty.name(),
                        b.ty.name()
                    ),
                )
                .at(span, "here")
                .with_help("conditions become numbers with `float(c)` or `if c then 1 else 0`"),
            ))
        };
        match op {
            BinOp::And | BinOp::Or => {
                if a.ty == Bool && b.ty == Bool {
                    Ok((a.expr, b.expr, Bool))
                } else {
                    bad(self, "needs two conditions")
                }
            }
            BinOp::Eq | BinOp::Ne if a.ty == Bool && b.ty == Bool => Ok((a.expr, b.expr, Bool)),
            _ if a.ty == Bool || b.ty == Bool => bad(self, "needs numbers"),
            BinOp::Rem | BinOp::FloorDiv => {
                if a.ty == Int && b.ty == Int {
                    Ok((a.expr, b.expr, Int))
                } else {
                    bad(self, "needs two ints")
                }
            }
            _ => {
                let float = a.ty == Float || b.ty == Float || matches!(op, BinOp::Div | BinOp::Pow);
                let ty = if op_is_comparison(op) {
                    Bool
                } else if float {
                    Float
                } else {
                    Int
                };
                if float {
                    Ok((to_float(a.expr, a.ty), to_float(b.expr, b.ty), ty))
                } else {
                    Ok((a.expr, b.expr, ty))
                }
            }
        }
    }

    /// Folds operations on two parameters/constants; `None` if either is a tensor.
    fn fold_static(
        &mut self,
        op: BinOp,
        a: &Value,
        b: &Value,
        sa: Span,
        sb: Span,
        span: Span,
    ) -> R<Option<Static>> {
        use Static::*;
        let (x, y) = match (a, b) {
            (Value::Static(x), Value::Static(y)) => (x.clone(), y.clone()),
            (Value::Static(x), Value::Symbol(s, ss)) => (x.clone(), self.symbol_as(s, *ss, x)?),
            (Value::Symbol(s, ss), Value::Static(y)) => (self.symbol_as(s, *ss, y)?, y.clone()),
            (Value::Symbol(s, ss), _) => return Err(self.unknown_name(s, *ss)),
            (_, Value::Symbol(s, ss)) => return Err(self.unknown_name(s, *ss)),
            (Value::Func(..), _) | (_, Value::Func(..)) => {
                let at = if matches!(a, Value::Func(..)) { sa } else { sb };
                return Err(self.error(
                    Diagnostic::error(codes::TYPE_MISMATCH, "a function is not a value")
                        .at(at, "call it: `f(x)`"),
                ));
            }
            _ => return Ok(None),
        };
        let num = |s: &Static| s.as_f64();
        let out = match (op, &x, &y) {
            (BinOp::Eq, _, _) => Bool(static_eq(&x, &y)),
            (BinOp::Ne, _, _) => Bool(!static_eq(&x, &y)),
            (BinOp::And, Bool(p), Bool(q)) => Bool(*p && *q),
            (BinOp::Or, Bool(p), Bool(q)) => Bool(*p || *q),
            (BinOp::Add, Int(p), Int(q)) => Int(p.saturating_add(*q)),
            (BinOp::Sub, Int(p), Int(q)) => Int(p.saturating_sub(*q)),
            (BinOp::Mul, Int(p), Int(q)) => Int(p.saturating_mul(*q)),
            (BinOp::Rem, Int(p), Int(q)) if *q != 0 => Int(p.rem_euclid(*q)),
            (BinOp::FloorDiv, Int(p), Int(q)) if *q != 0 => Int(p.div_euclid(*q)),
            (op, _, _) if num(&x).is_some() && num(&y).is_some() => {
                let (p, q) = (num(&x).unwrap_or(0.0), num(&y).unwrap_or(0.0));
                match op {
                    BinOp::Add => Float(p + q),
                    BinOp::Sub => Float(p - q),
                    BinOp::Mul => Float(p * q),
                    BinOp::Div => Float(p / q),
                    BinOp::Pow => Float(p.powf(q)),
                    BinOp::Lt => Bool(p < q),
                    BinOp::Le => Bool(p <= q),
                    BinOp::Gt => Bool(p > q),
                    BinOp::Ge => Bool(p >= q),
                    _ => return Err(self.static_type_error(op, &x, &y, span)),
                }
            }
            _ => return Err(self.static_type_error(op, &x, &y, span)),
        };
        Ok(Some(out))
    }

    fn static_type_error(&mut self, op: BinOp, x: &Static, y: &Static, span: Span) -> Reported {
        self.error(
            Diagnostic::error(
                codes::TYPE_MISMATCH,
                format!(
                    "`{}` cannot combine {} ({x}) and {} ({y})",
                    op.symbol(),
                    x.describe(),
                    y.describe()
                ),
            )
            .at(span, "here"),
        )
    }

    /// A bare name compared with a choice parameter is one of its choices.
    fn symbol_as(&mut self, name: &str, span: Span, other: &Static) -> R<Static> {
        let choices = match other {
            Static::Sym { choices, .. } => Some(choices.clone()),
            Static::List(items) => items.iter().find_map(|i| match i {
                Static::Sym { choices, .. } => Some(choices.clone()),
                _ => None,
            }),
            Static::Null => None,
            // A choice passed on as a bare name to a function, or a string.
            Static::Str(_) => None,
            _ => return Err(self.unknown_name(name, span)),
        };
        if let Some(c) = &choices {
            if !c.iter().any(|x| x == name) {
                let mut d = Diagnostic::error(
                    codes::BAD_CHOICE,
                    format!("`{name}` is not one of the choices {}", c.join(", ")),
                )
                .at(span, "not a choice");
                if let Some(close) = closest(name, c) {
                    d = d.with_help(format!("did you mean `{close}`?"));
                }
                return Err(self.error(d));
            }
            return Ok(Static::Sym {
                value: name.to_string(),
                choices: c.clone(),
            });
        }
        Ok(Static::Str(name.to_string()))
    }

    /// `x in list` for parameters.
    fn membership(&mut self, a: Value, b: Value, sa: Span, sb: Span, span: Span) -> R<Value> {
        let list = match b {
            Value::Static(Static::List(l)) => l,
            _ => {
                return Err(self.error(
                    Diagnostic::error(
                        codes::TYPE_MISMATCH,
                        "`in` needs a list parameter on its right",
                    )
                    .at(sb, "not a list"),
                ))
            }
        };
        let item = match a {
            Value::Static(s) => s,
            Value::Symbol(s, ss) => self.symbol_as(&s, ss, &Static::List(list.clone()))?,
            _ => {
                let _ = span;
                return Err(self.error(
                    Diagnostic::error(codes::NOT_STATIC, "`in` tests parameters, not tensors")
                        .at(sa, "a tensor"),
                ));
            }
        };
        Ok(Value::Static(Static::Bool(
            list.iter().any(|x| static_eq(x, &item)),
        )))
    }

    fn if_expr(
        &mut self,
        cond: &ast::Expr,
        then: &ast::Expr,
        otherwise: &ast::Expr,
        span: Span,
    ) -> R<Value> {
        match self.expr(cond)? {
            Value::Static(Static::Bool(true)) => self.expr(then),
            Value::Static(Static::Bool(false)) => self.expr(otherwise),
            c => {
                let c = self.to_val(c, cond.span)?;
                if c.ty != DType::Bool {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            format!("`if` needs a condition, found a {}", c.ty.name()),
                        )
                        .at(cond.span, "not a condition")
                        .with_help("compare it: `if x > 0 then ...`"),
                    ));
                }
                let t = self.expr(then)?;
                let t = self.to_val(t, then.span)?;
                let o = self.expr(otherwise)?;
                let o = self.to_val(o, otherwise.span)?;
                let (t, o, axes) = self.broadcast(t, o, span)?;
                let t = Val {
                    axes: axes.clone(),
                    ..t
                };
                let (c, t, axes) = self.broadcast(c, t, span)?;
                let o = Val { axes: vec![], ..o };
                let ty = match (t.ty, o.ty) {
                    (a, b) if a == b => a,
                    (DType::Bool, _) | (_, DType::Bool) => {
                        return Err(self.error(
                            Diagnostic::error(
                                codes::TYPE_MISMATCH,
                                "the branches of `if` have different types",
                            )
                            .at(span, format!("{} vs {}", t.ty.name(), o.ty.name())),
                        ))
                    }
                    _ => DType::Float,
                };
                let expr = Expr::Select(
                    Box::new(c.expr),
                    Box::new(to_float_if(t.expr, t.ty, ty)),
                    Box::new(to_float_if(o.expr, o.ty, ty)),
                );
                Ok(Value::Tensor(Val { expr, ty, axes }))
            }
        }
    }

    fn match_expr(
        &mut self,
        scrutinee: &ast::Expr,
        arms: &[ast::MatchArm],
        span: Span,
    ) -> R<Value> {
        let s = match self.expr(scrutinee)? {
            Value::Static(s) => s,
            // A `fn` parameter names its function; match on that name.
            Value::Func(_, name) => Static::Func(name),
            Value::Symbol(name, s) => return Err(self.unknown_name(&name, s)),
            _ => {
                return Err(self.error(
                    Diagnostic::error(codes::NOT_STATIC, "`match` chooses on a parameter")
                        .at(scrutinee.span, "this is a tensor")
                        .with_help("for elementwise choices use `if c then a else b`"),
                ))
            }
        };
        let key = match &s {
            Static::Sym { value, .. } | Static::Func(value) | Static::Str(value) => value.clone(),
            other => other.to_string(),
        };
        if let Static::Sym { choices, .. } = &s {
            for arm in arms {
                for p in arm.patterns.iter().flatten() {
                    if !choices.contains(&p.name) && p.name != "null" {
                        return Err(self.error(
                            Diagnostic::error(
                                codes::BAD_CHOICE,
                                format!(
                                    "`{}` is not one of the choices {}",
                                    p.name,
                                    choices.join(", ")
                                ),
                            )
                            .at(p.span, "never matches"),
                        ));
                    }
                }
            }
        }
        for arm in arms {
            let hit = arm.patterns.iter().any(|p| match p {
                None => true,
                Some(id) => id.name == key,
            });
            if hit {
                return self.expr(&arm.body);
            }
        }
        Err(self.error(
            Diagnostic::error(
                codes::BAD_CHOICE,
                format!("no arm of this `match` covers `{key}`"),
            )
            .at(span, "not exhaustive")
            .with_help("add an arm for it, or a final `_ => ...`"),
        ))
    }

    /// A `let` with or without binders (`let s[i, j] = ...`).
    pub(crate) fn let_value(&mut self, l: &ast::LetDecl) -> R<Value> {
        if l.binders.is_empty() {
            return self.expr(&l.value);
        }
        let vars = self.open_binders(&l.binders)?;
        let body = self.expr(&l.value);
        self.close_binders(vars.len());
        let body = body?;
        let body = self.to_val(body, l.value.span)?;
        let mut axes = Vec::new();
        for (v, b) in vars.iter().zip(&l.binders) {
            let d = self.extent_of(*v, b.name.span)?;
            axes.push((*v, d));
        }
        axes.extend(body.axes);
        Ok(Value::Tensor(Val {
            expr: body.expr,
            ty: body.ty,
            axes,
        }))
    }

    fn open_binders(&mut self, binders: &[ast::Binder]) -> R<Vec<IdxVar>> {
        let mut vars = Vec::new();
        let mut scope = HashMap::new();
        for b in binders {
            if let Some(over) = &b.over {
                return Err(self.error(
                    Diagnostic::error(
                        codes::NOT_STATIC,
                        "`in` binders unroll over a list and belong to `sum`/`mean`/`max`/`min`",
                    )
                    .at(over.span, "not allowed here"),
                ));
            }
            if scope.contains_key(&b.name.name) {
                return Err(self.error(
                    Diagnostic::error(
                        codes::DUPLICATE,
                        format!("the index `{}` is bound twice", b.name.name),
                    )
                    .at(b.name.span, "again"),
                ));
            }
            let v = self.graph.new_index(&b.name.name);
            if let Some(ext) = &b.extent {
                let d = self.dim(ext)?;
                // Only inputs declare dims; any other name here would be a
                // size no input fixes, failing only at run time.
                if let Some(s) = d.symbols().into_iter().find(|s| !self.dims.contains(s)) {
                    let mut help = format!(
                        "dims are declared by inputs; known here: {}",
                        self.dims.join(", ")
                    );
                    if let Some(c) = closest(&s, &self.dims) {
                        help = format!("did you mean `{c}`? {help}");
                    }
                    return Err(self.error(
                        Diagnostic::error(codes::UNKNOWN_NAME, format!("unknown dim `{s}`"))
                            .at(ext.span(), "no input has this dim")
                            .with_help(help),
                    ));
                }
                self.extents.insert(v, d);
            }
            scope.insert(b.name.name.clone(), Binding::Index(v));
            vars.push(v);
        }
        self.scopes.push(scope);
        self.ambient.extend(&vars);
        Ok(vars)
    }

    fn close_binders(&mut self, n: usize) {
        if let Some(scope) = self.scopes.pop() {
            self.closed_indices.extend(scope.into_keys());
        }
        let keep = self.ambient.len() - n;
        self.ambient.truncate(keep);
    }

    fn reduce(
        &mut self,
        op: RedOp,
        binders: &[ast::Binder],
        filter: Option<&ast::Expr>,
        default: Option<&ast::Expr>,
        body: Option<&ast::Expr>,
        span: Span,
    ) -> R<Value> {
        if let Some(b) = binders.iter().find(|b| b.over.is_some()) {
            return self.unrolled(op, b, binders, filter, default, body, span);
        }
        let vars = self.open_binders(binders)?;
        let parts = self.reduce_parts(op, filter, body, span);
        self.close_binders(vars.len());
        let (filter, body) = parts?;
        let mut over = Vec::new();
        for (v, b) in vars.iter().zip(binders) {
            over.push((*v, self.extent_of(*v, b.name.span)?));
        }
        // A tensor `else` value is chosen where nothing passes the filter.
        let mut fallback = None;
        let empty = match default {
            None => op.ir().identity(),
            Some(d) => match self.expr(d)? {
                Value::Static(s) if s.as_f64().is_some() => s.as_f64().unwrap_or(0.0),
                Value::Static(Static::Bool(b)) => f64::from(u8::from(b)),
                Value::Tensor(v) => {
                    fallback = Some(v);
                    op.ir().identity()
                }
                _ => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            "the `else` value of a reduction must be a number or a tensor",
                        )
                        .at(d.span, "not a number"),
                    ))
                }
            },
        };
        let count_parts = fallback.as_ref().map(|_| (over.clone(), filter.clone()));
        let (body, dtype) = match op {
            RedOp::Sum | RedOp::Max | RedOp::Min => {
                if body.ty == DType::Bool {
                    return Err(self.reduce_type_error(op, "numbers", body.ty, span));
                }
                let t = body.ty;
                (body, t)
            }
            RedOp::Mean | RedOp::LogSumExp => {
                if body.ty == DType::Bool {
                    return Err(self.reduce_type_error(op, "numbers", body.ty, span));
                }
                (
                    Val {
                        expr: to_float(body.expr, body.ty),
                        ty: DType::Float,
                        axes: body.axes,
                    },
                    DType::Float,
                )
            }
            RedOp::Any | RedOp::All => {
                if body.ty != DType::Bool {
                    return Err(self.reduce_type_error(op, "conditions", body.ty, span));
                }
                (body, DType::Bool)
            }
            RedOp::Count => (body, DType::Int),
        };
        let reduce = ir::Reduce {
            op: op.ir(),
            over,
            filter,
            empty,
        };
        let out = self.build_comp(body, Some(reduce), dtype, None, span)?;
        let (Some(fb), Some((over, filter))) = (fallback, count_parts) else {
            return Ok(Value::Tensor(out));
        };
        let count_body = Val {
            expr: Expr::Int(1),
            ty: DType::Int,
            axes: out.axes.clone(),
        };
        let creduce = ir::Reduce {
            op: ir::RedOp::Count,
            over,
            filter,
            empty: 0.0,
        };
        let count = self.build_comp(count_body, Some(creduce), DType::Int, None, span)?;
        let any = Expr::binary(IB::Gt, count.expr, Expr::Int(0));
        let (o, f, axes) = self.broadcast(out, fb, span)?;
        let ty = if o.ty == DType::Float || f.ty == DType::Float {
            DType::Float
        } else {
            o.ty
        };
        let expr = Expr::Select(
            Box::new(any),
            Box::new(to_float_if(o.expr, o.ty, ty)),
            Box::new(to_float_if(f.expr, f.ty, ty)),
        );
        Ok(Value::Tensor(Val { expr, ty, axes }))
    }

    fn reduce_type_error(&mut self, op: RedOp, want: &str, got: DType, span: Span) -> Reported {
        self.error(
            Diagnostic::error(
                codes::TYPE_MISMATCH,
                format!(
                    "`{}` reduces {want}, its body is a {}",
                    op.name(),
                    got.name()
                ),
            )
            .at(span, "here")
            .with_help(if want == "numbers" {
                "count conditions with `count(j | cond)`, or use `float(c)`"
            } else {
                // The body stops before a comparison: `any(j) x[j] > 0` is
                // `(any(j) x[j]) > 0`, so the advice needs the parentheses.
                "compare inside the body, in parentheses: `any(j) (x[j] > 0)`"
            }),
        )
    }

    /// Elaborates a reduction's filter and body inside its binders' scope.
    fn reduce_parts(
        &mut self,
        op: RedOp,
        filter: Option<&ast::Expr>,
        body: Option<&ast::Expr>,
        span: Span,
    ) -> R<(Option<Expr>, Val)> {
        let filter = match filter {
            None => None,
            Some(f) => {
                let v = self.expr(f)?;
                let v = self.to_val(v, f.span)?;
                if v.ty != DType::Bool || !v.axes.is_empty() {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            "a reduction filter must be a single condition",
                        )
                        .at(
                            f.span,
                            format!(
                                "a {} of shape {}",
                                v.ty.name(),
                                ir::dim::shape_string(&v.shape())
                            ),
                        )
                        .with_help("e.g. `max(j | labels[j] == labels[i] and j != i) d[i, j]`"),
                    ));
                }
                match v.expr {
                    Expr::Bool(true) => None,
                    e => Some(e),
                }
            }
        };
        let body = match (op, body) {
            (RedOp::Count, _) => Val::scalar(Expr::Int(1), DType::Int),
            (_, Some(b)) => {
                let v = self.expr(b)?;
                self.to_val(v, b.span)?
            }
            (_, None) => {
                return Err(self.error(
                    Diagnostic::error(codes::SYNTAX, "this reduction has no body").at(span, "here"),
                ))
            }
        };
        Ok((filter, body))
    }

    /// `sum(d in dims) body`: one copy of the body per list element.
    #[allow(clippy::too_many_arguments)]
    fn unrolled(
        &mut self,
        op: RedOp,
        b: &ast::Binder,
        binders: &[ast::Binder],
        filter: Option<&ast::Expr>,
        default: Option<&ast::Expr>,
        body: Option<&ast::Expr>,
        span: Span,
    ) -> R<Value> {
        let over = b.over.as_deref().expect("checked by caller");
        if binders.len() != 1
            || filter.is_some()
            || default.is_some()
            || !matches!(
                op,
                RedOp::Sum | RedOp::Mean | RedOp::Max | RedOp::Min | RedOp::LogSumExp
            )
        {
            return Err(self.error(
                Diagnostic::error(codes::NOT_STATIC, "a reduction over a list takes one `x in list` binder, no filter, and is sum, mean, max, min or logsumexp")
                    .at(span, "here"),
            ));
        }
        let items: Vec<Binding> = match self.expr(over)? {
            Value::Static(Static::List(items)) => items.into_iter().map(Binding::Static).collect(),
            Value::Tensors(ts) => ts.into_iter().map(Binding::Val).collect(),
            _ => {
                return Err(self.error(
                    Diagnostic::error(codes::NOT_STATIC, "`in` needs a list parameter")
                        .at(over.span, "not a list"),
                ))
            }
        };
        let Some(body) = body else {
            return Err(self.error(
                Diagnostic::error(codes::SYNTAX, "this reduction has no body").at(span, "here"),
            ));
        };
        let mut values = Vec::new();
        for item in &items {
            self.scopes
                .push(HashMap::from([(b.name.name.clone(), item.clone())]));
            let v = self.expr(body);
            self.scopes.pop();
            values.push(v?);
        }
        if op == RedOp::LogSumExp && values.len() > 1 {
            return self.logsumexp_of(values, span);
        }
        let mut acc: Option<Value> = None;
        for v in values {
            acc = Some(match acc {
                None => v,
                Some(a) => match op {
                    RedOp::Max | RedOp::Min => {
                        let f = if op == RedOp::Max { IB::Max } else { IB::Min };
                        self.elementwise2(f, a, v, span)?
                    }
                    _ => self.binary(BinOp::Add, a, v, span, span, span)?,
                },
            });
        }
        match (acc, op) {
            (None, _) => Ok(Value::Static(Static::Float(op.ir().identity()))),
            (Some(a), RedOp::Mean) => {
                let n = Value::Static(Static::Int(items.len() as i64));
                self.binary(BinOp::Div, a, n, span, span, span)
            }
            (Some(a), _) => Ok(a),
        }
    }

    /// log Σ exp(v) over a few values, shifted by their maximum for stability.
    fn logsumexp_of(&mut self, values: Vec<Value>, span: Span) -> R<Value> {
        let mut m = values[0].clone();
        for v in &values[1..] {
            m = self.elementwise2(IB::Max, m, v.clone(), span)?;
        }
        // The shift is used once per term: compute it once. Its gradient is
        // 1 - sum(softmax) = 0, so it is detached (a smaller gradient program).
        if let Value::Tensor(t) = m {
            let prefix = self.shared_prefix(std::slice::from_ref(&t));
            let id = self.materialize_in_scope(t, span, &prefix)?;
            let read = self.read_back(id, &prefix);
            m = Value::Tensor(Val {
                expr: Expr::unary(IU::Detach, read.expr),
                ..read
            });
        }
        let mut total: Option<Value> = None;
        for v in values {
            let shifted = self.binary(BinOp::Sub, v, m.clone(), span, span, span)?;
            let e = self.math_value(IU::Exp, shifted, span)?;
            total = Some(match total {
                None => e,
                Some(t) => self.binary(BinOp::Add, t, e, span, span, span)?,
            });
        }
        let total = total.expect("at least two values");
        let log = self.math_value(IU::Log, total, span)?;
        self.binary(BinOp::Add, m, log, span, span, span)
    }

    fn math_value(&mut self, op: IU, v: Value, span: Span) -> R<Value> {
        let v = self.to_val(v, span)?;
        Ok(Value::Tensor(Val {
            expr: Expr::unary(op, to_float(v.expr, v.ty)),
            ty: DType::Float,
            axes: v.axes,
        }))
    }

    /// `maximum(a, b)` / `minimum(a, b)` with broadcasting and promotion.
    pub(crate) fn elementwise2(&mut self, op: IB, a: Value, b: Value, span: Span) -> R<Value> {
        if let (Value::Static(x), Value::Static(y)) = (&a, &b) {
            if let (Some(p), Some(q)) = (x.as_f64(), y.as_f64()) {
                let r = if matches!(op, IB::Max | IB::ClampMin) {
                    p.max(q)
                } else {
                    p.min(q)
                };
                return Ok(Value::Static(match (x, y) {
                    (Static::Int(_), Static::Int(_)) => Static::Int(r as i64),
                    _ => Static::Float(r),
                }));
            }
        }
        let a = self.to_val(a, span)?;
        let b = self.to_val(b, span)?;
        let (a, b, axes) = self.broadcast(a, b, span)?;
        if a.ty == DType::Bool || b.ty == DType::Bool {
            return Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("`{}` needs numbers", op.symbol()),
                )
                .at(span, "a condition"),
            ));
        }
        let ty = if a.ty == DType::Float || b.ty == DType::Float {
            DType::Float
        } else {
            DType::Int
        };
        let expr = Expr::binary(
            op,
            to_float_if(a.expr, a.ty, ty),
            to_float_if(b.expr, b.ty, ty),
        );
        Ok(Value::Tensor(Val { expr, ty, axes }))
    }

    /// Evaluates call arguments, keeping names for later matching.
    pub(crate) fn args(&mut self, args: &[Arg]) -> R<Vec<(Option<ast::Ident>, Value, Span)>> {
        let mut out = Vec::new();
        for a in args {
            let v = self.expr(&a.value)?;
            out.push((a.name.clone(), v, a.value.span));
        }
        Ok(out)
    }
}

/// `x + 0`, `0 + x`, `x - 0`, `x * 1`, `1 * x`, `x / 1` for a float tensor `x`:
/// the tensor itself, so that parameter choices leave no dead arithmetic.
fn identity_operand(op: BinOp, a: &Value, b: &Value) -> Option<Value> {
    let is = |v: &Value, k: f64| matches!(v, Value::Static(s) if s.as_f64() == Some(k));
    let float_tensor = |v: &Value| matches!(v, Value::Tensor(t) if t.ty == DType::Float);
    match op {
        BinOp::Add if is(b, 0.0) && float_tensor(a) => Some(a.clone()),
        BinOp::Add if is(a, 0.0) && float_tensor(b) => Some(b.clone()),
        BinOp::Sub if is(b, 0.0) && float_tensor(a) => Some(a.clone()),
        BinOp::Mul if is(b, 1.0) && float_tensor(a) => Some(a.clone()),
        BinOp::Mul if is(a, 1.0) && float_tensor(b) => Some(b.clone()),
        BinOp::Div if is(b, 1.0) && float_tensor(a) => Some(a.clone()),
        _ => None,
    }
}

fn op_is_comparison(op: BinOp) -> bool {
    matches!(
        op,
        BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
    )
}

pub(crate) fn to_float(e: Expr, ty: DType) -> Expr {
    match (ty, e) {
        (DType::Float, e) => e,
        (_, Expr::Int(n)) => Expr::Float(n as f64),
        (_, e) => Expr::unary(IU::ToFloat, e),
    }
}

pub(crate) fn to_float_if(e: Expr, ty: DType, want: DType) -> Expr {
    if want == DType::Float {
        to_float(e, ty)
    } else {
        e
    }
}

/// The runtime value of a dim: a constant, or `size(..)`.
pub(crate) fn dim_value(d: &Dim) -> Expr {
    match d.as_lit() {
        Some(n) => Expr::Int(n),
        None => Expr::Size(d.clone()),
    }
}

/// The dim a compile-time size stands for: an int constant, a dim name, or
/// `+ - *` of those (`D - 1`, `B + C`). Dim names elaborate to `size(..)`
/// expressions, so arithmetic on them is read back from the IR expression.
pub(crate) fn static_dim_of(v: &Value) -> Option<Dim> {
    fn of(e: &Expr) -> Option<Dim> {
        match e {
            Expr::Int(n) => Some(Dim::lit(*n)),
            Expr::Size(d) => Some(d.clone()),
            Expr::Binary(op, a, b) => {
                let (a, b) = (of(a)?, of(b)?);
                match op {
                    IB::Add => Some(a.add(&b)),
                    IB::Sub => Some(a.sub(&b)),
                    IB::Mul => Some(a.mul(&b)),
                    _ => None,
                }
            }
            _ => None,
        }
    }
    match v {
        Value::Static(Static::Int(n)) => Some(Dim::lit(*n)),
        Value::Tensor(t) if t.axes.is_empty() && t.ty == DType::Int => of(&t.expr),
        _ => None,
    }
}

fn static_eq(a: &Static, b: &Static) -> bool {
    match (a, b) {
        (
            Static::Sym { value: x, .. } | Static::Str(x) | Static::Func(x),
            Static::Sym { value: y, .. } | Static::Str(y) | Static::Func(y),
        ) => x == y,
        (x, y) => match (x.as_f64(), y.as_f64()) {
            (Some(p), Some(q)) => p == q,
            _ => x == y,
        },
    }
}

impl RedOp {
    pub(crate) fn ir(self) -> ir::RedOp {
        match self {
            RedOp::Sum => ir::RedOp::Sum,
            RedOp::Mean => ir::RedOp::Mean,
            RedOp::Max => ir::RedOp::Max,
            RedOp::Min => ir::RedOp::Min,
            RedOp::LogSumExp => ir::RedOp::LogSumExp,
            RedOp::Count => ir::RedOp::Count,
            RedOp::Any => ir::RedOp::Any,
            RedOp::All => ir::RedOp::All,
        }
    }
}
