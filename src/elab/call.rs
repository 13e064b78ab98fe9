//! Calls: builtin functions (math, layout helpers) and inlining of `fn`s.
//!
//! A `fn` is inlined at every call: its parameters are bound to the argument
//! values (tensor expressions, parameters or functions) in a fresh scope, so a
//! function sees only its parameters, other functions and builtins. Recursion
//! is reported, never followed.

use super::expr::{dim_value, static_dim_of, to_float};
use super::value::{Binding, Val, Value};
use super::{Elab, Static, R};
use crate::ir::{self, BinOp as IB, DType, Dim, Expr, IdxVar, Node, NodeKind, UnOp as IU};
use crate::syntax::ast::{self, Arg, Stmt};
use crate::syntax::{codes, Diagnostic, FileId, Span};
use std::collections::HashMap;

type Args = Vec<(Option<ast::Ident>, Value, Span)>;

impl Elab<'_> {
    pub(crate) fn call(&mut self, callee: &ast::Expr, args: &[Arg], span: Span) -> R<Value> {
        if let Some(v) = self.input_query(callee, args, span)? {
            return Ok(v);
        }
        let f = match self.expr(callee)? {
            Value::Func(m, name) => (m, name),
            Value::Symbol(name, s) => return Err(self.unknown_name(&name, s)),
            Value::Static(spec @ Static::Loss { .. }) => {
                let args = self.args(args)?;
                return self.call_loss(&spec, callee.span, args, span);
            }
            Value::Lambda(f) => {
                let mut args = self.args(args)?;
                if args.len() != 1 || args[0].0.is_some() {
                    return Err(self.error(
                        Diagnostic::error(codes::ARITY, "a function value takes one argument")
                            .at(span, "here"),
                    ));
                }
                let (_, v, _) = args.remove(0);
                return self.apply_lambda(&f, v, span);
            }
            other => {
                // Name what was called, and give the indexing advice only for tensors.
                let what = match &other {
                    Value::Tensor(_) => "a tensor",
                    Value::Static(s) => s.describe(),
                    _ => "a value",
                };
                let mut d = Diagnostic::error(
                    codes::NOT_CALLABLE,
                    format!(
                        "`{}` is {what}, not a function",
                        self.program.sources.snippet(callee.span)
                    ),
                )
                .at(callee.span, "not callable");
                if matches!(other, Value::Tensor(_)) {
                    d = d.with_help("index a tensor with `x[i]`, not `x(i)`");
                }
                return Err(self.error(d));
            }
        };
        let args = self.args(args)?;
        match f {
            (Some(module), name) => self.inline(module, &name, args, span),
            (None, name) => self.builtin(&name, args, span),
        }
    }

    /// `present(x)` and `form(x)`: static facts about an input, answered
    /// without evaluating it (an absent input has no value).
    fn input_query(&mut self, callee: &ast::Expr, args: &[Arg], span: Span) -> R<Option<Value>> {
        let ast::ExprKind::Name(f) = &callee.kind else {
            return Ok(None);
        };
        if !matches!(f.as_str(), "present" | "form") || self.lookup(f).is_some() {
            return Ok(None);
        }
        let [Arg {
            name: None,
            value:
                ast::Expr {
                    kind: ast::ExprKind::Name(input),
                    span: ispan,
                },
        }] = args
        else {
            return Err(self.error(
                Diagnostic::error(codes::ARITY, format!("`{f}` takes the name of one input"))
                    .at(span, "here")
                    .with_help(format!("`{f}(negative)`")),
            ));
        };
        // Whether the name is an input here: an input node, an absent optional
        // input, or (in a called loss) an input bound to the caller's value.
        let called = self
            .call_inputs
            .as_ref()
            .is_some_and(|c| c.contains_key(input));
        let present = match self.lookup(input) {
            Some(Binding::Absent(_)) => Some(false),
            Some(Binding::Node(id))
                if matches!(self.graph.node(*id).kind, NodeKind::Input { .. }) =>
            {
                Some(true)
            }
            Some(Binding::Val(_)) if called => Some(true),
            _ => None,
        };
        match (f.as_str(), present) {
            ("present", Some(p)) => Ok(Some(Value::Static(Static::Bool(p)))),
            ("form", Some(true)) => Ok(Some(Value::Static(Static::Int(
                self.forms.get(input).copied().unwrap_or(0) as i64,
            )))),
            ("form", Some(false)) => Err(self.error(
                Diagnostic::error(
                    codes::MISSING_TENSOR,
                    format!("`{input}` is absent, so it has no form"),
                )
                .at(*ispan, "absent")
                .with_help(format!("test `present({input})` first")),
            )),
            _ => Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("`{f}` asks about an input; `{input}` is not one"),
                )
                .at(*ispan, "not an input"),
            )),
        }
    }

    fn inline(&mut self, module: FileId, name: &str, args: Args, span: Span) -> R<Value> {
        let program = self.program;
        let Some(decl) = program.module(module).fns.get(name) else {
            return Err(self.unknown_name(name, span));
        };
        let key = format!("{name}");
        if self.call_stack.contains(&key) {
            let mut chain = self.call_stack.clone();
            chain.push(key);
            let from = chain.iter().position(|c| c == name).unwrap_or(0);
            return Err(self.error(
                Diagnostic::error(codes::RECURSION, format!("`{name}` calls itself ({})", chain[from..].join(" → ")))
                    .at(span, "recursive call")
                    .with_help("functions are inlined where they are called, so they cannot recurse; write the repetition as a reduction"),
            ));
        }
        let params: Vec<String> = decl.params.iter().map(|p| p.name.name.clone()).collect();
        let bound = self.match_args(name, &params, args, span)?;
        let mut scope = HashMap::new();
        for (p, (value, vspan)) in decl.params.iter().zip(bound) {
            if let (Some(ty), Value::Tensor(v)) = (&p.ty, &value) {
                self.check_param_shape(name, p, ty, v, vspan, &mut scope)?;
            }
            scope.insert(p.name.name.clone(), super::value::binding_of(value));
        }
        let saved_scopes = std::mem::replace(&mut self.scopes, vec![scope]);
        let saved_module = std::mem::replace(&mut self.module, module);
        // The function's own reduction indices are not the caller's business.
        let saved_closed = std::mem::take(&mut self.closed_indices);
        self.call_stack.push(name.to_string());
        let result = self.fn_block(&decl.body);
        self.call_stack.pop();
        self.closed_indices = saved_closed;
        self.module = saved_module;
        self.scopes = saved_scopes;
        result.map_err(|r| {
            if let Some(d) = self.diags.last_mut() {
                if d.related.len() < 4 {
                    d.related.push((span, format!("in this call of `{name}`")));
                }
            }
            r
        })
    }

    /// Matches positional and named arguments to parameter names.
    fn match_args(
        &mut self,
        fname: &str,
        params: &[String],
        args: Args,
        span: Span,
    ) -> R<Vec<(Value, Span)>> {
        let mut slots: Vec<Option<(Value, Span)>> = vec![None; params.len()];
        let mut positional = 0;
        for (name, value, vspan) in args {
            let slot = match name {
                None => {
                    positional += 1;
                    positional - 1
                }
                Some(n) => match params.iter().position(|p| *p == n.name) {
                    Some(i) => i,
                    None => {
                        return Err(self.error(
                            Diagnostic::error(
                                codes::BAD_ARGUMENT,
                                format!("`{fname}` has no parameter `{}`", n.name),
                            )
                            .at(n.span, "unknown argument name")
                            .with_help(format!("its parameters: {}", params.join(", "))),
                        ))
                    }
                },
            };
            if slot >= params.len() {
                return Err(self.error(
                    Diagnostic::error(
                        codes::ARITY,
                        format!(
                            "`{fname}` takes {} arguments, {} given",
                            params.len(),
                            slot + 1
                        ),
                    )
                    .at(vspan, "extra argument")
                    .with_help(format!("`{fname}({})`", params.join(", "))),
                ));
            }
            slots[slot] = Some((value, vspan));
        }
        let mut out = Vec::new();
        for (i, s) in slots.into_iter().enumerate() {
            match s {
                Some(v) => out.push(v),
                None => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::ARITY,
                            format!("`{fname}` needs the argument `{}`", params[i]),
                        )
                        .at(span, "missing argument")
                        .with_help(format!("`{fname}({})`", params.join(", "))),
                    ))
                }
            }
        }
        Ok(out)
    }

    /// `fn f(x: [D])`: the argument's rank must match, and dim names unify
    /// across the parameters of one call.
    fn check_param_shape(
        &mut self,
        fname: &str,
        p: &ast::FnParam,
        ty: &ast::TensorTy,
        v: &Val,
        vspan: Span,
        scope: &mut HashMap<String, Binding>,
    ) -> R<()> {
        let shape = v.shape();
        let bad = |el: &mut Self, what: String| {
            Err(el.error(
                Diagnostic::error(
                    codes::SHAPE_MISMATCH,
                    format!("argument `{}` of `{fname}` {what}", p.name.name),
                )
                .at(vspan, format!("shape {}", ir::dim::shape_string(&shape)))
                .with_related(ty.span, "declared here"),
            ))
        };
        if shape.len() != ty.dims.len() {
            return bad(self, format!("must have rank {}", ty.dims.len()));
        }
        for (d, actual) in ty.dims.iter().zip(&shape) {
            match d {
                ast::DimExpr::Name(n) => match scope.get(&n.name) {
                    Some(Binding::Dim(prev)) if prev != actual => {
                        return bad(
                            self,
                            format!(
                                "has {} = {actual}, where an earlier argument has {} = {prev}",
                                n.name, n.name
                            ),
                        )
                    }
                    Some(_) => {}
                    None => {
                        scope.insert(n.name.clone(), Binding::Dim(actual.clone()));
                    }
                },
                ast::DimExpr::Lit(k, _) if Dim::lit(*k) != *actual => {
                    return bad(self, format!("must have a dim of size {k}"))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A function body: `let`s and `require`s, then the result.
    fn fn_block(&mut self, block: &ast::Block) -> R<Value> {
        for stmt in &block.stmts {
            match stmt {
                Stmt::Let(l) => {
                    let binding = match self.let_value(l)? {
                        // Outside index notation a tensor `let` is a named node,
                        // as at loss level; inside, it stays an expression.
                        Value::Tensor(v) if self.ambient.is_empty() => Binding::Node(
                            self.materialize_named(v, Some(l.name.name.clone()), l.span)?,
                        ),
                        v => super::value::binding_of(v),
                    };
                    self.bind(&l.name.name, binding);
                }
                Stmt::Require {
                    cond,
                    message,
                    span,
                } => self.require(cond, message, *span)?,
                Stmt::InputsOf { span, .. } => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            "functions take their tensors as parameters, not inputs",
                        )
                        .at(*span, "`input ..` belongs in a `loss`"),
                    ))
                }
                Stmt::Input(i) => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            "functions take their tensors as parameters, not inputs",
                        )
                        .at(i.span, "`input` belongs in a `loss`")
                        .with_help("add a parameter: `fn f(x) = ...`"),
                    ))
                }
                Stmt::Output { name, .. } => {
                    return Err(self.error(
                        Diagnostic::error(codes::TYPE_MISMATCH, "`output` belongs in a `loss`")
                            .at(name.span, "inside a function"),
                    ))
                }
            }
        }
        self.expr(&block.result)
    }

    fn builtin(&mut self, name: &str, args: Args, span: Span) -> R<Value> {
        if let Some(op) = IU::from_fn_name(name) {
            let [(_, v, vs)] = self.fixed::<1>(name, args, span)?;
            return self.math1(op, v, vs);
        }
        match name {
            "maximum" | "minimum" => {
                let [(_, a, _), (_, b, _)] = self.fixed::<2>(name, args, span)?;
                let op = if name == "maximum" { IB::Max } else { IB::Min };
                self.elementwise2(op, a, b, span)
            }
            "clamp" => {
                let [(_, x, _), (_, lo, _), (_, hi, _)] = self.fixed::<3>(name, args, span)?;
                let low = self.elementwise2(IB::ClampMin, x, lo, span)?;
                self.elementwise2(IB::ClampMax, low, hi, span)
            }
            "clamp_min" | "clamp_max" => {
                let [(_, x, _), (_, bound, _)] = self.fixed::<2>(name, args, span)?;
                let op = if name == "clamp_min" {
                    IB::ClampMin
                } else {
                    IB::ClampMax
                };
                self.elementwise2(op, x, bound, span)
            }
            "concat" => self.concat(args, span),
            "stack" => self.stack(args, span),
            "flatten" => {
                let [(_, x, xs)] = self.fixed::<1>(name, args, span)?;
                let v = self.to_val(x, xs)?;
                self.flatten(v, span)
            }
            "flatten_rows" => {
                let [(_, x, xs)] = self.fixed::<1>(name, args, span)?;
                let v = self.to_val(x, xs)?;
                if v.axes.is_empty() {
                    return Err(self.error(
                        Diagnostic::error(codes::SHAPE_MISMATCH, "`flatten_rows` needs a tensor")
                            .at(xs, "a scalar"),
                    ));
                }
                self.flatten_rows(v, span)
            }
            "transpose" => {
                let [(_, x, xs)] = self.fixed::<1>(name, args, span)?;
                let mut v = self.to_val(x, xs)?;
                let n = v.axes.len();
                if n < 2 {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::SHAPE_MISMATCH,
                            "`transpose` needs a tensor of rank 2 or more",
                        )
                        .at(xs, "rank < 2"),
                    ));
                }
                v.axes.swap(n - 2, n - 1);
                Ok(Value::Tensor(v))
            }
            "arange" | "eye" => {
                let [(_, n, ns)] = self.fixed::<1>(name, args, span)?;
                let d = self.size_arg(n, ns)?;
                let i = self.fresh_axis(&d);
                if name == "arange" {
                    return Ok(Value::Tensor(Val {
                        expr: Expr::Index(i),
                        ty: DType::Int,
                        axes: vec![(i, d)],
                    }));
                }
                let j = self.fresh_axis(&d);
                let eq = Expr::binary(IB::Eq, Expr::Index(i), Expr::Index(j));
                let expr = Expr::Select(
                    Box::new(eq),
                    Box::new(Expr::Float(1.0)),
                    Box::new(Expr::Float(0.0)),
                );
                Ok(Value::Tensor(Val {
                    expr,
                    ty: DType::Float,
                    axes: vec![(i, d.clone()), (j, d)],
                }))
            }
            "range" => {
                let [(_, n, ns)] = self.fixed::<1>(name, args, span)?;
                let count = match n {
                    Value::Static(Static::Int(k)) => Some(k),
                    Value::Tensor(Val {
                        expr,
                        axes,
                        ty: DType::Int,
                    }) if axes.is_empty() => self.static_int(&expr),
                    _ => None,
                };
                let Some(count) = count else {
                    return Err(self.error(Diagnostic::error(codes::NOT_STATIC, "`range` takes an int known when compiling: a constant, or dims such as `L - 1`").at(ns, "not static")));
                };
                Ok(Value::Static(Static::List(
                    (0..count.max(0)).map(Static::Int).collect(),
                )))
            }
            "sample" => {
                let [(_, l, ls), (_, n, ns)] = self.fixed::<2>(name, args, span)?;
                match (l, n) {
                    (Value::Static(Static::List(list)), Value::Static(Static::Int(k))) => {
                        Ok(Value::Static(Static::List(self.sample(list, k))))
                    }
                    _ => Err(self.error(
                        Diagnostic::error(
                            codes::NOT_STATIC,
                            "`sample(list, n)` takes a list and an int",
                        )
                        .at(ls.to(ns), "here"),
                    )),
                }
            }
            "truncate" => {
                let [(_, x, xs), (_, d, ds)] = self.fixed::<2>(name, args, span)?;
                let v = self.to_val(x, xs)?;
                let Some((axis, dim)) = v.axes.last().cloned() else {
                    return Err(self.error(
                        Diagnostic::error(codes::SHAPE_MISMATCH, "`truncate` needs a tensor")
                            .at(xs, "a scalar"),
                    ));
                };
                let len = match d {
                    Value::Static(Static::Int(k)) if k >= 0 => Dim::lit(k),
                    _ => return Err(self.error(Diagnostic::error(codes::NOT_STATIC, "`truncate(x, d)` keeps the first d entries of the last dim; d must be an int constant").at(ds, "not an int constant"))),
                };
                if let (Some(k), Some(n)) = (len.as_lit(), dim.as_lit()) {
                    if k > n {
                        return Err(self.error(
                            Diagnostic::error(
                                codes::BAD_INDEX,
                                format!("cannot truncate a dim of size {n} to {k}"),
                            )
                            .at(ds, "too large"),
                        ));
                    }
                }
                let v2 = self.fresh_axis(&len);
                let map = std::collections::BTreeMap::from([(axis, Expr::Index(v2))]);
                let mut axes = v.axes.clone();
                let last = axes.len() - 1;
                axes[last] = (v2, len);
                Ok(Value::Tensor(Val {
                    expr: v.expr.subst(&map),
                    ty: v.ty,
                    axes,
                }))
            }
            "normalize_rows" => {
                let [(_, x, xs)] = self.fixed::<1>(name, args, span)?;
                let v = self.to_val(x, xs)?;
                self.normalize_rows(v, xs)
            }
            "embeddings" => {
                let [(_, _, _)] = self.fixed::<1>(name, args, span)?;
                Ok(Value::Tensors(self.wrapped_embedding_values()))
            }
            "len" => {
                let [(_, x, xs)] = self.fixed::<1>(name, args, span)?;
                match x {
                    Value::Static(Static::List(l)) => {
                        Ok(Value::Static(Static::Int(l.len() as i64)))
                    }
                    Value::Tensors(ts) => Ok(Value::Static(Static::Int(ts.len() as i64))),
                    _ => Err(self.error(
                        Diagnostic::error(codes::TYPE_MISMATCH, "`len` takes a list parameter")
                            .at(xs, "not a list")
                            .with_help("the size of a tensor dim is `size(x, axis)`"),
                    )),
                }
            }
            "size" => {
                let [(_, x, xs), (_, a, as_)] = self.fixed::<2>(name, args, span)?;
                let v = self.to_val(x, xs)?;
                let axis = self.axis_arg(a, as_, v.axes.len())?;
                Ok(Value::Tensor(Val::scalar(
                    dim_value(&v.axes[axis].1),
                    DType::Int,
                )))
            }
            _ => Err(self.unknown_name(name, span)),
        }
    }

    fn fixed<const N: usize>(
        &mut self,
        name: &str,
        args: Args,
        span: Span,
    ) -> R<[(Option<ast::Ident>, Value, Span); N]> {
        if let Some((Some(n), _, _)) = args.iter().find(|a| a.0.is_some()) {
            let n = n.clone();
            return Err(self.error(
                Diagnostic::error(
                    codes::BAD_ARGUMENT,
                    format!("`{name}` takes no named arguments"),
                )
                .at(n.span, "here"),
            ));
        }
        let count = args.len();
        args.try_into().map_err(|_| {
            self.error(
                Diagnostic::error(
                    codes::ARITY,
                    format!(
                        "`{name}` takes {N} argument{}, {count} given",
                        if N == 1 { "" } else { "s" }
                    ),
                )
                .at(span, "here"),
            )
        })
    }

    fn math1(&mut self, op: IU, v: Value, span: Span) -> R<Value> {
        if let Value::Static(s) = &v {
            if let Some(x) = s.as_f64() {
                let r = match op {
                    IU::Exp => Some(crate::math::exp_f64(x)),
                    IU::Log => Some(x.ln()),
                    IU::Sqrt => Some(x.sqrt()),
                    IU::Abs => Some(x.abs()),
                    IU::Tanh => Some(x.tanh()),
                    IU::ToFloat | IU::Detach => Some(x),
                    _ => None,
                };
                if let Some(r) = r {
                    return Ok(Value::Static(Static::Float(r)));
                }
            }
        }
        let v = self.to_val(v, span)?;
        match (op, v.ty) {
            (IU::ToFloat, DType::Float) | (IU::Detach, DType::Int) | (IU::Detach, DType::Bool) => {
                Ok(Value::Tensor(v))
            }
            (IU::ToFloat, _) => Ok(Value::Tensor(Val {
                expr: Expr::unary(IU::ToFloat, v.expr),
                ty: DType::Float,
                axes: v.axes,
            })),
            (_, DType::Bool) => Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("`{}` needs a number, found a condition", op.name()),
                )
                .at(span, "a bool")
                .with_help("convert with `float(c)`"),
            )),
            _ => Ok(Value::Tensor(Val {
                expr: Expr::unary(op, to_float(v.expr, v.ty)),
                ty: DType::Float,
                axes: v.axes,
            })),
        }
    }

    fn size_arg(&mut self, v: Value, span: Span) -> R<Dim> {
        if let Value::Symbol(name, s) = &v {
            // An undefined name (`arange(E)` with no dim E) is an unknown name.
            return Err(self.unknown_name(name, *s));
        }
        match static_dim_of(&v) {
            Some(d) if d.as_lit().is_none_or(|n| n >= 0) => Ok(d),
            _ => Err(self.error(
                Diagnostic::error(
                    codes::NOT_STATIC,
                    "a size must be a dim name, an int constant, or `+ - *` of those",
                )
                .at(span, "not a size"),
            )),
        }
    }

    fn axis_arg(&mut self, v: Value, span: Span, rank: usize) -> R<usize> {
        match v {
            Value::Static(Static::Int(n)) if n >= 0 && (n as usize) < rank => Ok(n as usize),
            _ => Err(self.error(
                Diagnostic::error(
                    codes::BAD_INDEX,
                    format!("the axis must be an int constant below the rank ({rank})"),
                )
                .at(span, "bad axis"),
            )),
        }
    }

    /// The enclosing index variables any of these values use, in scope order.
    pub(crate) fn shared_prefix(&self, vals: &[Val]) -> Vec<IdxVar> {
        let mut used = Vec::new();
        for v in vals {
            for u in self.ambient_used(&[&v.expr], &v.axes) {
                if !used.contains(&u) {
                    used.push(u);
                }
            }
        }
        self.ambient
            .iter()
            .copied()
            .filter(|v| used.contains(v))
            .collect()
    }

    pub(crate) fn read_back(&mut self, id: ir::NodeId, prefix: &[IdxVar]) -> Val {
        let node = self.graph.node(id).clone();
        let mut at: Vec<Expr> = prefix.iter().map(|p| Expr::Index(*p)).collect();
        let mut axes = Vec::new();
        for d in &node.shape[prefix.len()..] {
            let a = self.fresh_axis(d);
            at.push(Expr::Index(a));
            axes.push((a, d.clone()));
        }
        Val {
            expr: Expr::read(id, at),
            ty: node.dtype,
            axes,
        }
    }

    fn tensor_args(
        &mut self,
        name: &str,
        args: Args,
        span: Span,
    ) -> R<(Vec<Val>, HashMap<String, (Value, Span)>)> {
        let mut vals = Vec::new();
        let mut named = HashMap::new();
        for (n, v, vs) in args {
            match n {
                Some(n) => {
                    named.insert(n.name.clone(), (v, n.span));
                }
                None => vals.push(self.to_val(v, vs)?),
            }
        }
        if vals.is_empty() {
            return Err(self.error(
                Diagnostic::error(codes::ARITY, format!("`{name}` needs at least one tensor"))
                    .at(span, "no tensors"),
            ));
        }
        Ok((vals, named))
    }

    /// `concat(a, b, ..., axis=0)`.
    fn concat(&mut self, args: Args, span: Span) -> R<Value> {
        let (vals, mut named) = self.tensor_args("concat", args, span)?;
        let rank = vals[0].axes.len();
        let axis = match named.remove("axis") {
            Some((v, s)) => self.axis_arg(v, s, rank)?,
            None => 0,
        };
        if let Some((k, (_, s))) = named.into_iter().next() {
            return Err(self.error(
                Diagnostic::error(
                    codes::BAD_ARGUMENT,
                    format!("`concat` has no argument `{k}`"),
                )
                .at(s, "only `axis=` is accepted"),
            ));
        }
        if rank == 0 {
            return Err(self.error(
                Diagnostic::error(codes::SHAPE_MISMATCH, "`concat` joins tensors, not scalars")
                    .at(span, "rank 0")
                    .with_help("use `stack(a, b)` for scalars"),
            ));
        }
        let ty = if vals.iter().any(|v| v.ty == DType::Float) {
            DType::Float
        } else {
            vals[0].ty
        };
        let prefix = self.shared_prefix(&vals);
        let mut parts = Vec::new();
        let mut total = Dim::lit(0);
        let first_shape = vals[0].shape();
        for v in vals {
            let shape = v.shape();
            let compatible = shape.len() == rank
                && shape
                    .iter()
                    .zip(&first_shape)
                    .enumerate()
                    .all(|(k, (a, b))| k == axis || a == b);
            if !compatible || (v.ty == DType::Bool) != (ty == DType::Bool) {
                let (s1, s2) = (
                    ir::dim::shape_string(&first_shape),
                    ir::dim::shape_string(&shape),
                );
                return Err(self.error(
                    Diagnostic::error(
                        codes::SHAPE_MISMATCH,
                        format!("`concat` along axis {axis} needs equal other dims: {s1} and {s2}"),
                    )
                    .at(span, "here"),
                ));
            }
            total = total.add(&shape[axis]);
            let v = if ty == DType::Float && v.ty == DType::Int {
                Val {
                    expr: to_float(v.expr, v.ty),
                    ty,
                    axes: v.axes,
                }
            } else {
                v
            };
            parts.push(self.materialize_in_scope(v, span, &prefix)?);
        }
        let mut shape = self.prefix_shape(&prefix, span)?;
        let mut dims = first_shape;
        dims[axis] = total;
        shape.extend(dims);
        let kind = NodeKind::Concat {
            axis: prefix.len() + axis,
            parts,
        };
        let id = self.graph.push(Node {
            kind,
            dtype: ty,
            shape,
            name: None,
            span: Some(span),
        });
        Ok(Value::Tensor(self.read_back(id, &prefix)))
    }

    fn prefix_shape(&mut self, prefix: &[IdxVar], span: Span) -> R<Vec<Dim>> {
        prefix.iter().map(|p| self.extent_of(*p, span)).collect()
    }

    /// `flatten(x)`: the first two dims become one (row-major).
    /// `flatten_rows(x)`: every dim but the last merged into one (rows of vectors).
    fn flatten_rows(&mut self, v: Val, span: Span) -> R<Value> {
        if v.axes.len() <= 2 {
            return Ok(Value::Tensor(v));
        }
        let dims = v.shape();
        let rows = dims[..dims.len() - 1]
            .iter()
            .fold(Dim::lit(1), |a, d| a.mul(d));
        let last = dims[dims.len() - 1].clone();
        self.reshape_in_scope(v, vec![rows, last], span)
    }

    /// Materialises `v` and reads it back through a reshape to `dims`
    /// (row-major order kept), indexed by the enclosing variables it uses.
    fn reshape_in_scope(&mut self, v: Val, dims: Vec<Dim>, span: Span) -> R<Value> {
        let prefix = self.shared_prefix(std::slice::from_ref(&v));
        let ty = v.ty;
        let src = self.materialize_in_scope(v, span, &prefix)?;
        let mut shape = self.prefix_shape(&prefix, span)?;
        shape.extend(dims);
        let kind = NodeKind::Reshape { src };
        let id = self.graph.push(Node {
            kind,
            dtype: ty,
            shape,
            name: None,
            span: Some(span),
        });
        Ok(Value::Tensor(self.read_back(id, &prefix)))
    }

    fn flatten(&mut self, v: Val, span: Span) -> R<Value> {
        if v.axes.len() < 2 {
            return Err(self.error(
                Diagnostic::error(
                    codes::SHAPE_MISMATCH,
                    "`flatten` needs a tensor of rank 2 or more",
                )
                .at(span, "rank < 2"),
            ));
        }
        let dims = v.shape();
        let merged = std::iter::once(dims[0].mul(&dims[1]))
            .chain(dims[2..].iter().cloned())
            .collect();
        self.reshape_in_scope(v, merged, span)
    }

    /// `stack(a, b, ...)`: a new leading dim.
    fn stack(&mut self, args: Args, span: Span) -> R<Value> {
        let (vals, named) = self.tensor_args("stack", args, span)?;
        if let Some((k, (_, s))) = named.into_iter().next() {
            return Err(self.error(
                Diagnostic::error(
                    codes::BAD_ARGUMENT,
                    format!("`stack` has no argument `{k}`"),
                )
                .at(s, "not accepted"),
            ));
        }
        let first = vals[0].shape();
        let n = vals.len() as i64;
        let ty = if vals.iter().any(|v| v.ty == DType::Float) {
            DType::Float
        } else {
            vals[0].ty
        };
        // Stacking is a comprehension: out[s, ...] = if s == 0 then a else if s == 1 then b ...
        let s = self.fresh_axis(&Dim::lit(n));
        let mut expr: Option<Expr> = None;
        let mut axes = Vec::new();
        for (k, v) in vals.into_iter().enumerate().rev() {
            if v.shape() != first {
                let (s1, s2) = (
                    ir::dim::shape_string(&first),
                    ir::dim::shape_string(&v.shape()),
                );
                return Err(self.error(
                    Diagnostic::error(
                        codes::SHAPE_MISMATCH,
                        format!("`stack` needs equal shapes: {s1} and {s2}"),
                    )
                    .at(span, "here"),
                ));
            }
            let v = Val {
                expr: if ty == DType::Float {
                    to_float(v.expr, v.ty)
                } else {
                    v.expr
                },
                ..v
            };
            let (v, axes_now) = match axes.is_empty() {
                true => {
                    let a = v.axes.clone();
                    (v, a)
                }
                false => {
                    let target = Val {
                        expr: Expr::Float(0.0),
                        ty,
                        axes: axes.clone(),
                    };
                    let (_, b, a) = self.broadcast(target, v, span)?;
                    (b, a)
                }
            };
            axes = axes_now;
            expr = Some(match expr {
                None => v.expr,
                Some(rest) => {
                    let cond = Expr::binary(IB::Eq, Expr::Index(s), Expr::Int(k as i64));
                    Expr::Select(Box::new(cond), Box::new(v.expr), Box::new(rest))
                }
            });
        }
        let mut all_axes = vec![(s, Dim::lit(n))];
        all_axes.extend(axes);
        Ok(Value::Tensor(Val {
            expr: expr.unwrap_or(Expr::Float(0.0)),
            ty,
            axes: all_axes,
        }))
    }

    /// An int expression free of index variables, evaluated when compiling
    /// (dims take their given or assumed sizes).
    fn static_int(&self, e: &Expr) -> Option<i64> {
        Some(match e {
            Expr::Int(n) => *n,
            Expr::Size(d) => self.static_size(d),
            Expr::Binary(op, a, b) => {
                let (x, y) = (self.static_int(a)?, self.static_int(b)?);
                match op {
                    IB::Add => x + y,
                    IB::Sub => x - y,
                    IB::Mul => x * y,
                    IB::FloorDiv if y != 0 => x.div_euclid(y),
                    IB::Rem if y != 0 => x.rem_euclid(y),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// `normalize_rows(x)`: x / clamp_min(||x||, 1e-12) along the last dim
    /// (F.normalize), for a tensor of any rank.
    fn normalize_rows(&mut self, v: Val, span: Span) -> R<Value> {
        let Some((last, dim)) = v.axes.last().cloned() else {
            return Err(self.error(
                Diagnostic::error(codes::SHAPE_MISMATCH, "`normalize_rows` needs a tensor")
                    .at(span, "a scalar"),
            ));
        };
        let k = self.fresh_axis(&dim);
        let row = std::collections::BTreeMap::from([(last, Expr::Index(k))]);
        let xk = v.expr.subst(&row);
        let square = Val {
            expr: Expr::binary(IB::Mul, xk.clone(), xk),
            ty: DType::Float,
            axes: v.axes[..v.axes.len() - 1].to_vec(),
        };
        let reduce = ir::Reduce {
            op: ir::RedOp::Sum,
            over: vec![(k, dim)],
            filter: None,
            empty: 0.0,
        };
        let sum = self.build_comp(square, Some(reduce), DType::Float, None, span)?;
        let norm = Expr::binary(
            IB::ClampMin,
            Expr::unary(IU::Sqrt, sum.expr),
            Expr::Float(1e-12),
        );
        Ok(Value::Tensor(Val {
            expr: Expr::binary(IB::Div, v.expr, norm),
            ty: DType::Float,
            axes: v.axes,
        }))
    }
}
