//! Losses over losses: a loss parameter (`loss: loss`) can be called like a
//! function, and `input ..loss` declares the inputs of the loss it holds.
//!
//! A call `loss(embedding = x => f(x), labels = y => g(y), name = value)`
//! elaborates the inner loss's body in its own scope, with its parameters,
//! binding each of its inputs to: the named argument, if given; otherwise the
//! value the enclosing loss has for an input of that name, passed through the
//! `embedding` function if it is an embedding (a float input whose last dim is
//! `D`, the embedding dimension by convention) or through `labels` if it is
//! `labels` with last dim `D`. Nothing here knows any particular loss: a
//! wrapper works over the standard library, a user's loss, or another wrapper.

use super::value::{Binding, Val, Value};
use super::{params, Elab, Reported, Static, R};
use crate::ir::{DType, Dim, Expr, Node, NodeKind};
use crate::syntax::ast::{self, ElemTy, Stmt};
use crate::syntax::{codes, Diagnostic, FileId, Span};
use std::collections::HashMap;

/// A function value `x => body`, with the scope it was written in.
#[derive(Clone, Debug)]
pub(crate) struct Lambda {
    pub param: String,
    pub body: ast::Expr,
    pub scopes: Vec<HashMap<String, Binding>>,
    pub module: FileId,
}

/// Sizes assumed for static queries (`range(L)`) when no tensors are known;
/// the same defaults random inputs use.
pub fn default_size(name: &str) -> i64 {
    match name {
        "B" => 8,
        "D" => 16,
        "K" => 1,
        _ => 4,
    }
}

impl<'p> Elab<'p> {
    /// The declaration and bound parameters of an inner loss value.
    fn inner_loss(
        &mut self,
        spec: &Static,
        span: Span,
    ) -> R<(FileId, &'p ast::LossDecl, Vec<(String, Static)>)> {
        let Static::Loss { name, params: json } = spec else {
            return Err(self.error(
                Diagnostic::error(
                    codes::TYPE_MISMATCH,
                    format!("expected a loss, found {}", spec.describe()),
                )
                .at(span, "not a loss"),
            ));
        };
        let program: &'p super::Program = self.program;
        let Some((file, decl)) = program.find_loss(Some(self.module), name) else {
            let mut known: Vec<String> = program
                .std_losses()
                .iter()
                .map(|(_, l)| l.name.name.clone())
                .collect();
            known.sort();
            return Err(self.error(
                Diagnostic::error(codes::NO_SUCH_LOSS, format!("no loss named `{name}`"))
                    .at(span, "the inner loss")
                    .with_help(format!("known losses: {}", known.join(", "))),
            ));
        };
        let fns = program.visible_fns(file);
        let cx = params::ParamContext { fns: &fns };
        match params::bind(decl, file, json, &cx, false) {
            Ok(p) => Ok((file, decl, p)),
            Err(diags) => {
                let n = diags.len();
                self.diags.extend(diags);
                if let Some(d) = self.diags.last_mut() {
                    d.related.push((
                        span,
                        format!("parameters of the inner loss `{name}` ({n} problem(s))"),
                    ));
                }
                Err(Reported)
            }
        }
    }

    /// `input ..loss [per layer L]`.
    pub(crate) fn inputs_of(
        &mut self,
        loss: &ast::Ident,
        per_layer: Option<&ast::DimExpr>,
        span: Span,
    ) -> R<()> {
        let spec = match self.lookup(&loss.name).cloned() {
            Some(Binding::Static(s @ Static::Loss { .. })) => s,
            _ => {
                return Err(self.error(
                    Diagnostic::error(
                        codes::TYPE_MISMATCH,
                        format!("`input ..{}` needs a parameter of type `loss`", loss.name),
                    )
                    .at(loss.span, "not a loss parameter")
                    .with_help("declare it: `loss Wrapper(loss: loss) { input ..loss ... }`"),
                ))
            }
        };
        let layers = match per_layer {
            Some(d) => Some(self.dim(d)?),
            None => None,
        };
        let declared = self.declare_inputs_of(&spec, layers.as_ref(), span)?;
        for (name, binding) in declared {
            self.bind(&name, binding);
        }
        Ok(())
    }

    /// Declares (as inputs of the graph) the inputs of an inner loss, recursively.
    fn declare_inputs_of(
        &mut self,
        spec: &Static,
        layers: Option<&Dim>,
        span: Span,
    ) -> R<Vec<(String, Binding)>> {
        let (file, decl, params) = self.inner_loss(spec, span)?;
        let saved_scopes = std::mem::replace(
            &mut self.scopes,
            vec![params
                .into_iter()
                .map(|(k, v)| (k, Binding::Static(v)))
                .collect()],
        );
        let saved_module = std::mem::replace(&mut self.module, file);
        let mut out = Vec::new();
        let mut result = Ok(());
        for stmt in &decl.body.stmts {
            let r = match stmt {
                Stmt::Input(i) => self.declare_wrapped_input(i, layers).map(|b| out.extend(b)),
                Stmt::InputsOf {
                    loss,
                    per_layer,
                    span,
                } => {
                    let inner = self.lookup(&loss.name).cloned();
                    let inner_layers = match per_layer {
                        Some(d) => self.dim(d).ok(),
                        None => layers.cloned(),
                    };
                    match inner {
                        Some(Binding::Static(s)) => self
                            .declare_inputs_of(&s, inner_layers.as_ref(), *span)
                            .map(|b| out.extend(b)),
                        _ => Ok(()),
                    }
                }
                _ => Ok(()),
            };
            if r.is_err() {
                result = r;
            }
        }
        self.scopes = saved_scopes;
        self.module = saved_module;
        result.map(|_| out)
    }

    /// One inner input, declared in the wrapper (per layer if it is an embedding).
    fn declare_wrapped_input(
        &mut self,
        i: &ast::InputDecl,
        layers: Option<&Dim>,
    ) -> R<Option<(String, Binding)>> {
        let name = &i.name.name;
        if self.input_env.contains_key(name) {
            return Ok(None);
        }
        let first: Vec<Dim> = i.types[0]
            .dims
            .iter()
            .map(|d| self.dim(d))
            .collect::<R<_>>()?;
        let embedding = is_embedding(name, i.types[0].elem, &first);
        let (outer_name, prefix) = match (layers, embedding) {
            (Some(l), true) => (format!("all_layers_{name}"), Some(l.clone())),
            _ => (name.clone(), None),
        };
        let binding = self.declare_input_as(i, &outer_name, prefix)?;
        self.input_env.insert(name.clone(), binding.clone());
        if embedding {
            self.wrapped_embeddings.push(binding.clone());
        }
        Ok(Some((outer_name, binding)))
    }

    /// Creates the input node for a declaration under `outer_name`, with an
    /// optional leading dim (layers); picks optional/alternative forms from the
    /// given tensors like a plain input.
    pub(crate) fn declare_input_as(
        &mut self,
        input: &ast::InputDecl,
        outer_name: &str,
        layers: Option<Dim>,
    ) -> R<Binding> {
        let full = self
            .given
            .and_then(|g| super::given_shape(g, outer_name, input.variadic));
        // A layered input is [L, ...] ([K, L, ...] for a column input, whose
        // columns stack first); the inner input is the rest.
        let rank = input.types[0].dims.len();
        let (layer_size, inner) = match (&layers, full) {
            (Some(_), Some(s)) if input.variadic && s.len() == rank => {
                (s.first().copied(), Some([&[1][..], &s[1..]].concat()))
            }
            (Some(_), Some(s)) if input.variadic && s.len() > rank => {
                (s.get(1).copied(), Some([&s[..1], &s[2..]].concat()))
            }
            (Some(_), Some(s)) => (s.first().copied(), Some(s.get(1..).unwrap_or(&[]).to_vec())),
            (_, s) => (None, s),
        };
        if let (Some(l), Some(n)) = (&layers, layer_size) {
            if l.eval(&self.sizes).is_none() {
                if let Some((sym, v)) = l.solve(n as i64, &self.sizes) {
                    self.sizes.insert(sym, v);
                }
            }
        }
        let given = self.given.map(|_| inner);
        if input.optional && given.as_ref().is_none_or(|g| g.is_none()) {
            return Ok(Binding::Absent(input.span));
        }
        let (form, mut shape) = self.choose_form(input, given.flatten())?;
        if input.types.len() > 1 {
            self.forms.insert(input.name.name.clone(), form);
        }
        let layer_axis = usize::from(input.variadic);
        if let Some(l) = &layers {
            shape.insert(layer_axis, l.clone());
        }
        for d in &shape {
            for s in d.symbols() {
                if !self.dims.contains(&s) {
                    self.dims.push(s);
                }
            }
        }
        let dtype = match input.types[form].elem {
            ElemTy::Float => DType::Float,
            ElemTy::Int => DType::Int,
            ElemTy::Bool => DType::Bool,
        };
        let kind = NodeKind::Input {
            name: outer_name.to_string(),
            variadic: input.variadic,
        };
        let id = self.graph.push(Node {
            kind,
            dtype,
            shape,
            name: Some(outer_name.to_string()),
            span: Some(input.span),
        });
        if layers.is_some() && layer_axis == 1 {
            // Seen from the wrapper, the layer dim comes first: [L, K, ...].
            let mut v = self.node_val(id);
            v.axes.swap(0, 1);
            return Ok(Binding::Val(v));
        }
        Ok(Binding::Node(id))
    }

    /// `loss(embedding = f, labels = g, name = value)`.
    pub(crate) fn call_loss(
        &mut self,
        spec: &Static,
        callee_span: Span,
        args: Vec<(Option<ast::Ident>, Value, Span)>,
        span: Span,
    ) -> R<Value> {
        if !self.ambient.is_empty() {
            return Err(self.error(
                Diagnostic::error(codes::NOT_SCALAR, "a loss call is a whole loss, not an element: it cannot be inside index notation")
                    .at(span, "inside a comprehension or reduction over indices")
                    .with_help("combine losses with scalar arithmetic or with `sum(d in list) ...`"),
            ));
        }
        let (file, decl, params) = self.inner_loss(spec, callee_span)?;
        let name = decl.name.name.clone();
        if self.call_stack.contains(&name) {
            return Err(self.error(
                Diagnostic::error(codes::RECURSION, format!("the loss `{name}` calls itself"))
                    .at(span, "recursive loss call"),
            ));
        }
        let mut embedding_fn = None;
        let mut labels_fn = None;
        let mut explicit: HashMap<String, Value> = HashMap::new();
        for (n, v, vspan) in args {
            match (n.as_ref().map(|n| n.name.as_str()), v) {
                (Some("embedding"), Value::Lambda(l)) => embedding_fn = Some(l),
                (Some("labels"), Value::Lambda(l)) => labels_fn = Some(l),
                (Some(input), v) => {
                    explicit.insert(input.to_string(), v);
                }
                (None, _) => {
                    return Err(self.error(
                        Diagnostic::error(codes::BAD_ARGUMENT, "a loss call takes named arguments")
                            .at(vspan, "positional")
                            .with_help("`loss(embedding = x => f(x))`, `loss(labels = y => g(y))` or `loss(anchor = value)`"),
                    ))
                }
            }
        }
        // The values of the inner loss's inputs.
        // Sorted, so that the nodes the transforms create come in a stable order.
        let mut env: Vec<(String, Binding)> = self
            .input_env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.sort_by(|a, b| a.0.cmp(&b.0));
        let mut values: HashMap<String, Value> = HashMap::new();
        for (input, binding) in env {
            if let Some(v) = explicit.remove(&input) {
                values.insert(input, v);
                continue;
            }
            let value = match binding {
                Binding::Node(id) => Value::Tensor(self.node_val(id)),
                Binding::Val(v) => Value::Tensor(self.refresh(&v)),
                Binding::Absent(_) => continue,
                other => super::value::value_of(other),
            };
            let transform = match &value {
                Value::Tensor(v) if input == "labels" && last_is_d(v) => labels_fn.as_ref(),
                Value::Tensor(v) if input != "labels" && v.ty == DType::Float && last_is_d(v) => {
                    embedding_fn.as_ref()
                }
                _ => None,
            };
            let value = match transform {
                // The transformed input is a node of its own, read by the
                // inner loss like any input: its similarity stays a plain
                // contraction (GEMM) and its gradient flows through one
                // adjoint instead of being re-derived inside every use.
                Some(f) => match self.apply_lambda(f, value, span)? {
                    Value::Tensor(v) => {
                        let axes = v.axes.clone();
                        let id = self.materialize_named(v, Some(input.clone()), span)?;
                        let at = axes.iter().map(|(a, _)| Expr::Index(*a)).collect();
                        Value::Tensor(Val {
                            expr: Expr::read(id, at),
                            ty: self.graph.nodes[id.index()].dtype,
                            axes,
                        })
                    }
                    other => other,
                },
                None => value,
            };
            values.insert(input, value);
        }
        if let Some(extra) = explicit.keys().next() {
            return Err(self.error(
                Diagnostic::error(
                    codes::BAD_ARGUMENT,
                    format!("`{name}` has no input `{extra}`"),
                )
                .at(span, "unknown input"),
            ));
        }
        let saved_scopes = std::mem::replace(
            &mut self.scopes,
            vec![params
                .into_iter()
                .map(|(k, v)| (k, Binding::Static(v)))
                .collect()],
        );
        let saved_module = std::mem::replace(&mut self.module, file);
        let saved_env = std::mem::replace(
            &mut self.input_env,
            values
                .iter()
                .map(|(k, v)| (k.clone(), super::value::binding_of(v.clone())))
                .collect(),
        );
        let saved_call = self.call_inputs.replace(values);
        self.call_stack.push(name.clone());
        let mut result: R<Value> = Ok(Value::Static(Static::Float(0.0)));
        for stmt in &decl.body.stmts {
            if let Err(r) = self.loss_stmt(stmt) {
                result = Err(r);
            }
        }
        if result.is_ok() {
            result = self
                .expr(&decl.body.result)
                .and_then(|v| self.to_val(v, decl.body.result.span).map(Value::Tensor));
        }
        self.call_stack.pop();
        self.call_inputs = saved_call;
        self.input_env = saved_env;
        self.module = saved_module;
        self.scopes = saved_scopes;
        if let (Err(_), Some(d)) = (&result, self.diags.last_mut()) {
            if d.related.len() < 4 {
                d.related.push((span, format!("in this call of `{name}`")));
            }
        }
        let value = result?;
        if let Value::Tensor(v) = &value {
            if !v.axes.is_empty() {
                return Err(self.error(
                    Diagnostic::error(
                        codes::NOT_SCALAR,
                        format!("`{name}` did not return a scalar"),
                    )
                    .at(span, "here"),
                ));
            }
        }
        Ok(value)
    }

    pub(crate) fn apply_lambda(&mut self, f: &Lambda, arg: Value, span: Span) -> R<Value> {
        let mut scopes = f.scopes.clone();
        scopes.push(HashMap::from([(
            f.param.clone(),
            super::value::binding_of(arg),
        )]));
        let saved_scopes = std::mem::replace(&mut self.scopes, scopes);
        let saved_module = std::mem::replace(&mut self.module, f.module);
        let out = self.expr(&f.body);
        self.scopes = saved_scopes;
        self.module = saved_module;
        if out.is_err() {
            if let Some(d) = self.diags.last_mut() {
                d.related
                    .push((span, "while applying this function".into()));
            }
        }
        out
    }

    /// The size of a dim known when compiling: from the given tensors, else the
    /// defaults random inputs use.
    pub(crate) fn static_size(&self, d: &Dim) -> i64 {
        let mut sizes = self.sizes.clone();
        for s in d.symbols() {
            let v = self
                .default_sizes
                .get(&s)
                .copied()
                .unwrap_or_else(|| default_size(&s));
            sizes.entry(s).or_insert(v);
        }
        d.eval(&sizes).unwrap_or(0)
    }

    /// `sample(list, n)`: n elements of the list, drawn with the run's seed,
    /// in list order; the whole list when n <= 0 or n >= its length.
    pub(crate) fn sample(&mut self, list: Vec<Static>, n: i64) -> Vec<Static> {
        if n <= 0 || n as usize >= list.len() {
            return list;
        }
        let mut rng = crate::bind::SplitMix64::new(
            self.seed ^ (self.samples_drawn as u64).wrapping_mul(0x9E37),
        );
        self.samples_drawn += 1;
        let mut idx: Vec<usize> = (0..list.len()).collect();
        for k in (1..idx.len()).rev() {
            let j = (rng.next() % (k as u64 + 1)) as usize;
            idx.swap(k, j);
        }
        let mut chosen: Vec<usize> = idx[..n as usize].to_vec();
        chosen.sort();
        chosen.into_iter().map(|k| list[k].clone()).collect()
    }

    /// `embeddings(loss)`: the embedding inputs `input ..loss` declared, in order.
    pub(crate) fn wrapped_embedding_values(&mut self) -> Vec<Val> {
        let all = self.wrapped_embeddings.clone();
        all.into_iter()
            .filter_map(|b| match b {
                Binding::Node(id) => Some(self.node_val(id)),
                Binding::Val(v) => Some(self.refresh(&v)),
                _ => None,
            })
            .collect()
    }
}

fn is_embedding(name: &str, elem: ElemTy, shape: &[Dim]) -> bool {
    name != "labels" && elem == ElemTy::Float && shape.last().and_then(|d| d.as_sym()) == Some("D")
}

fn last_is_d(v: &Val) -> bool {
    v.axes.last().and_then(|a| a.1.as_sym()) == Some("D")
}
