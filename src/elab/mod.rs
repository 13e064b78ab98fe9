//! Elaboration: AST + parameter values → graph IR.
//!
//! This is where names are resolved, static parameters are substituted (so
//! `if`/`match` over them vanish), functions are inlined, index extents and
//! shapes are inferred, and every tensor expression becomes IR nodes.
//!
//! The central idea: while elaborating, a tensor-valued expression is a `Val`,
//! a scalar IR expression over the enclosing index variables plus its own
//! anonymous axes (`anchor[i]` is `anchor[i, d]` with a free axis `d`).
//! Indexing substitutes axes; elementwise operations broadcast by unifying
//! axes; a reduction becomes its own comprehension node over exactly the index
//! variables its body uses (so `norm(anchor[i])` is computed once per row, not
//! once per pair); `let` at loss level materialises a node. Nothing here
//! evaluates tensors, and no diagnostic is fatal to the file: statements after
//! an error are still checked.

mod call;
mod expr;
pub mod params;
pub mod program;
mod value;
mod wrap;

use crate::ir::{self, DType, Dim, Graph, Node, NodeKind};
use crate::syntax::ast::{self, DimExpr, ElemTy, LossDecl, Stmt};
use crate::syntax::{codes, Diagnostic, FileId, Span};
pub use params::Static;
pub use program::Program;

use std::collections::HashMap;
use value::{Binding, Val, Value};

/// Raised after a diagnostic has been recorded; the caller skips the rest of
/// the current statement.
#[derive(Debug)]
pub(crate) struct Reported;
pub(crate) type R<T> = Result<T, Reported>;

/// Which loss to elaborate, and with what parameters.
pub struct LossRequest<'a> {
    pub file: FileId,
    pub decl: &'a LossDecl,
    pub params: Vec<(String, Static)>,
    /// The shapes of the tensors it will run on, if known.
    pub given: Option<&'a GivenShapes>,
    /// Seed of random choices (`sample`).
    pub seed: u64,
    /// Sizes assumed for static queries when `given` is absent.
    pub default_sizes: std::collections::BTreeMap<String, i64>,
}

/// Elaborates one loss with bound parameters into a verified graph.
pub fn elaborate(program: &Program, req: &LossRequest) -> Result<Graph, Vec<Diagnostic>> {
    let mut el = Elab::new(program, req.file);
    el.given = req.given;
    el.seed = req.seed;
    el.default_sizes = req.default_sizes.clone();
    el.graph.name = req.decl.name.name.clone();
    let result = el.loss_body(req.decl, &req.params);
    if el.diags.iter().any(|d| d.is_error()) || result.is_err() {
        if el.diags.is_empty() {
            el.diags.push(
                Diagnostic::error(codes::MISSING_RESULT, "the loss could not be elaborated")
                    .at(req.decl.name.span, ""),
            );
        }
        return Err(el.diags);
    }
    if let Err(e) = ir::verify::verify(&el.graph) {
        panic!(
            "internal error: elaboration produced an invalid graph: {e}\n{}",
            ir::print::print_graph(&el.graph)
        );
    }
    Ok(el.graph)
}

pub(crate) struct Elab<'p> {
    program: &'p Program,
    graph: Graph,
    diags: Vec<Diagnostic>,
    /// Innermost last. Function bodies get a fresh stack (functions are closed).
    scopes: Vec<HashMap<String, Binding>>,
    /// Index variables in scope, outermost first.
    ambient: Vec<ir::IdxVar>,
    extents: HashMap<ir::IdxVar, Dim>,
    /// Symbolic dims declared by inputs; usable as int values.
    dims: Vec<String>,
    /// The file whose functions are visible (changes while inlining).
    module: FileId,
    call_stack: Vec<String>,
    /// Index names of the reductions closed in the current statement, to
    /// explain `sum(i) a[i] + b[i]` (the body ends before `+`).
    closed_indices: Vec<String>,
    /// The shapes of the tensors the loss will run on, when known: they pick
    /// optional inputs and shape alternatives.
    given: Option<&'p GivenShapes>,
    /// Sizes solved from `given` so far.
    sizes: std::collections::BTreeMap<String, i64>,
    /// The alternative each multi-shape input took (`form(x)`).
    forms: HashMap<String, usize>,
    /// The inputs a loss call passes on to its inner loss, by the inner name.
    input_env: HashMap<String, Binding>,
    /// While elaborating the body of a called loss: the values of its inputs.
    call_inputs: Option<HashMap<String, Value>>,
    /// The embedding inputs `input ..loss` declared (`embeddings(loss)`).
    wrapped_embeddings: Vec<Binding>,
    /// Seed for `sample(..)`, and how many samples were drawn so far.
    seed: u64,
    samples_drawn: usize,
    /// Sizes assumed for static queries when no tensors are given (`--dims`).
    default_sizes: std::collections::BTreeMap<String, i64>,
}

/// Input name (without `input.`) → shape, of the tensors a loss will run on.
pub type GivenShapes = std::collections::BTreeMap<String, Vec<usize>>;

/// The shape a tensor map gives an input: the plain key, or a variadic input's
/// columns (`name`, `name_1..`, `name1..`) stacked.
fn given_shape(given: &GivenShapes, name: &str, variadic: bool) -> Option<Vec<usize>> {
    if let Some(s) = given.get(name) {
        return Some(s.clone());
    }
    if !variadic {
        return None;
    }
    for sep in ["_", ""] {
        let cols: Vec<&Vec<usize>> = (1..)
            .map_while(|n| given.get(&format!("{name}{sep}{n}")))
            .collect();
        if let Some(first) = cols.first() {
            let mut shape = vec![cols.len()];
            shape.extend(first.iter());
            return Some(shape);
        }
    }
    None
}

/// The sizes under which `shape` equals `actual`, extending `sizes`; `None` if
/// it cannot. A variadic input given as one unstacked column fits too.
fn fits(
    shape: &[Dim],
    actual: &[usize],
    sizes: &std::collections::BTreeMap<String, i64>,
) -> Option<std::collections::BTreeMap<String, i64>> {
    let padded: Vec<usize>;
    let actual = if actual.len() + 1 == shape.len() {
        padded = std::iter::once(1).chain(actual.iter().copied()).collect();
        &padded
    } else {
        actual
    };
    if shape.len() != actual.len() {
        return None;
    }
    let mut sizes = sizes.clone();
    for _ in 0..2 {
        for (d, n) in shape.iter().zip(actual) {
            match d.eval(&sizes) {
                Some(v) if v != *n as i64 => return None,
                Some(_) => {}
                None => {
                    if let Some((sym, v)) = d.solve(*n as i64, &sizes) {
                        sizes.insert(sym, v);
                    }
                }
            }
        }
    }
    Some(sizes)
}

impl<'p> Elab<'p> {
    fn new(program: &'p Program, module: FileId) -> Elab<'p> {
        Elab {
            program,
            graph: Graph::default(),
            diags: Vec::new(),
            scopes: vec![HashMap::new()],
            ambient: Vec::new(),
            extents: HashMap::new(),
            dims: Vec::new(),
            module,
            call_stack: Vec::new(),
            closed_indices: Vec::new(),
            given: None,
            sizes: Default::default(),
            forms: HashMap::new(),
            input_env: HashMap::new(),
            call_inputs: None,
            wrapped_embeddings: Vec::new(),
            seed: 0,
            samples_drawn: 0,
            default_sizes: Default::default(),
        }
    }

    pub(crate) fn error(&mut self, d: Diagnostic) -> Reported {
        self.diags.push(d);
        Reported
    }

    fn bind(&mut self, name: &str, b: Binding) {
        if let Some(s) = self.scopes.last_mut() {
            s.insert(name.to_string(), b);
        }
    }

    fn lookup(&self, name: &str) -> Option<&Binding> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }

    fn loss_body(&mut self, decl: &LossDecl, params: &[(String, Static)]) -> R<()> {
        for (name, v) in params {
            self.bind(name, Binding::Static(v.clone()));
            if name == "mini_batch_size" {
                if let Static::Int(n) = v {
                    self.graph.hints.insert(name.clone(), *n);
                }
            }
        }
        let mut failed = false;
        for stmt in &decl.body.stmts {
            failed |= self.loss_stmt(stmt).is_err();
        }
        let result = &decl.body.result;
        self.closed_indices.clear();
        let value = self.expr(result);
        let id = match value {
            Ok(v) => self.scalar_output(v, result.span, "the loss")?,
            Err(r) => return Err(r),
        };
        self.graph.outputs.insert(0, ("loss".into(), id));
        if failed {
            Err(Reported)
        } else {
            Ok(())
        }
    }

    fn loss_stmt(&mut self, stmt: &Stmt) -> R<()> {
        self.closed_indices.clear();
        let result = self.loss_stmt_inner(stmt);
        // A failed `let` or `input` still defines its name (unless an earlier
        // definition holds it), so later uses add no "unknown name" errors.
        let defined = match stmt {
            Stmt::Let(l) => Some(&l.name.name),
            Stmt::Input(i) => Some(&i.name.name),
            _ => None,
        };
        if let (Err(_), Some(name)) = (&result, defined) {
            if self.scopes.last().is_some_and(|s| !s.contains_key(name)) {
                self.bind(name, Binding::Failed);
            }
        }
        result
    }

    fn loss_stmt_inner(&mut self, stmt: &Stmt) -> R<()> {
        match stmt {
            Stmt::Input(input) => self.input(input),
            Stmt::InputsOf {
                loss,
                per_layer,
                span,
            } => match self.call_inputs {
                // In a called loss, the inputs are already bound.
                Some(_) => Ok(()),
                None => self.inputs_of(loss, per_layer.as_ref(), *span),
            },
            Stmt::Let(l) => {
                self.check_shadowing(&l.name)?;
                let val = self.let_value(l)?;
                let binding = match val {
                    Value::Tensor(v) => {
                        let id = self.materialize_named(v, Some(l.name.name.clone()), l.span)?;
                        Binding::Node(id)
                    }
                    other => value::binding_of(other),
                };
                self.bind(&l.name.name, binding);
                Ok(())
            }
            Stmt::Require {
                cond,
                message,
                span,
            } => self.require(cond, message, *span),
            // A called loss contributes its value only, not its components.
            Stmt::Output { .. } if self.call_inputs.is_some() => Ok(()),
            Stmt::Output { name, value } => {
                let v = self.expr(value)?;
                // `output x = null` (after static choices) leaves the component out.
                if matches!(v, Value::Static(Static::Null)) {
                    return Ok(());
                }
                let id = self.scalar_output(v, value.span, &format!("output `{}`", name.name))?;
                if self.graph.outputs.iter().any(|(n, _)| n == &name.name) || name.name == "loss" {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::DUPLICATE,
                            format!("output `{}` is defined twice", name.name),
                        )
                        .at(name.span, "again here"),
                    ));
                }
                self.graph.outputs.push((name.name.clone(), id));
                Ok(())
            }
        }
    }

    /// A `let` may not reuse the name of an input, parameter or earlier `let`.
    fn check_shadowing(&mut self, name: &ast::Ident) -> R<()> {
        if self
            .scopes
            .last()
            .is_some_and(|s| s.contains_key(&name.name))
        {
            return Err(self.error(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("`{}` is already defined in this loss", name.name),
                )
                .at(name.span, "defined again here")
                .with_help("give the new definition its own name"),
            ));
        }
        Ok(())
    }

    fn require(&mut self, cond: &ast::Expr, message: &str, span: Span) -> R<()> {
        match self.expr(cond)? {
            Value::Static(Static::Bool(true)) => Ok(()),
            Value::Static(Static::Bool(false)) => {
                let mut d = Diagnostic::error(codes::REQUIRE_FAILED, message.to_string())
                    .at(span, "this requirement does not hold");
                let params = self.describe_params(cond);
                if !params.is_empty() {
                    d = d.with_help(format!("with {params}"));
                }
                Err(self.error(d))
            }
            _ => Err(self.error(
                Diagnostic::error(
                    codes::NOT_STATIC,
                    "`require` needs a condition on parameters",
                )
                .at(cond.span, "this depends on tensor values")
                .with_help(
                    "requirements are checked when the loss is compiled, before any tensor exists",
                ),
            )),
        }
    }

    /// `scale = 0, margin = 1` for the parameters a condition mentions.
    fn describe_params(&self, e: &ast::Expr) -> String {
        let mut names = Vec::new();
        collect_names(e, &mut names);
        let mut parts = Vec::new();
        for n in names {
            if let Some(Binding::Static(s)) = self.lookup(&n) {
                let part = format!("{n} = {s}");
                if !parts.contains(&part) {
                    parts.push(part);
                }
            }
        }
        parts.join(", ")
    }

    fn input(&mut self, input: &ast::InputDecl) -> R<()> {
        self.check_shadowing(&input.name)?;
        let name = &input.name.name;
        if let Some(values) = &self.call_inputs {
            let binding = match values.get(name) {
                Some(v) => value::binding_of(v.clone()),
                None => Binding::Absent(input.span),
            };
            self.bind(name, binding);
            return Ok(());
        }
        let given = self.given.map(|g| given_shape(g, name, input.variadic));
        if input.optional && given.as_ref().is_none_or(|g| g.is_none()) {
            self.bind(name, Binding::Absent(input.span));
            self.input_env
                .insert(name.clone(), Binding::Absent(input.span));
            return Ok(());
        }
        let (form, shape) = self.choose_form(input, given.flatten())?;
        let ty = &input.types[form];
        if input.types.len() > 1 {
            self.forms.insert(name.clone(), form);
        }
        if input.variadic && shape.first().and_then(|d| d.as_sym()).is_none() {
            return Err(self.error(
                Diagnostic::error(codes::TYPE_MISMATCH, "a column input needs a leading dim that counts the columns")
                    .at(ty.span, "e.g. `[K, B, D] = []`")
                    .with_help("`= []` means zero or more columns stacked along the first dim; name that dim (K)"),
            ));
        }
        for d in &shape {
            for s in d.symbols() {
                if !self.dims.contains(&s) {
                    self.dims.push(s);
                }
            }
        }
        let dtype = match ty.elem {
            ElemTy::Float => DType::Float,
            ElemTy::Int => DType::Int,
            ElemTy::Bool => DType::Bool,
        };
        let kind = NodeKind::Input {
            name: name.clone(),
            variadic: input.variadic,
        };
        let id = self.graph.push(Node {
            kind,
            dtype,
            shape,
            name: Some(name.clone()),
            span: Some(input.span),
        });
        self.bind(name, Binding::Node(id));
        self.input_env.insert(name.clone(), Binding::Node(id));
        Ok(())
    }

    /// Picks the declared shape the given tensor fits (the first one when no
    /// tensors are known), solving sizes from the tensors seen so far.
    fn choose_form(
        &mut self,
        input: &ast::InputDecl,
        given: Option<Vec<usize>>,
    ) -> R<(usize, Vec<Dim>)> {
        let mut shapes = Vec::new();
        for ty in &input.types {
            let mut shape = Vec::new();
            for d in &ty.dims {
                shape.push(self.dim(d)?);
            }
            shapes.push(shape);
        }
        let Some(actual) = given else {
            return Ok((0, shapes.swap_remove(0)));
        };
        for (k, shape) in shapes.iter().enumerate() {
            if let Some(sizes) = fits(shape, &actual, &self.sizes) {
                self.sizes = sizes;
                return Ok((k, shape.clone()));
            }
        }
        if shapes.len() == 1 {
            // Binding reports the mismatch with the tensor's details.
            return Ok((0, shapes.swap_remove(0)));
        }
        let alts: Vec<String> = shapes.iter().map(|s| ir::dim::shape_string(s)).collect();
        let known: Vec<String> = self
            .sizes
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect();
        Err(self.error(
            Diagnostic::error(
                codes::TENSOR_SHAPE,
                format!(
                    "input `{}` has shape {actual:?}, which fits none of {}",
                    input.name.name,
                    alts.join(" | ")
                ),
            )
            .at(input.span, "declared here")
            .with_help(if known.is_empty() {
                "give a tensor of one of these shapes".to_string()
            } else {
                format!("with {}", known.join(", "))
            }),
        ))
    }

    /// A dim written in a type: names of int parameters are their values,
    /// other names are symbolic sizes.
    fn dim(&mut self, d: &DimExpr) -> R<Dim> {
        Ok(match d {
            DimExpr::Lit(n, span) => {
                if *n < 0 || *n > i32::MAX as i64 {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::SHAPE_MISMATCH,
                            "a dim must be a non-negative size",
                        )
                        .at(*span, "here"),
                    ));
                }
                Dim::lit(*n)
            }
            DimExpr::Name(id) => match self.lookup(&id.name) {
                Some(Binding::Static(Static::Int(n))) if *n >= 0 => Dim::lit(*n),
                Some(Binding::Static(Static::Int(n))) => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::SHAPE_MISMATCH,
                            format!("a dim must be a non-negative size, `{}` is {n}", id.name),
                        )
                        .at(id.span, "used as a dim here"),
                    ))
                }
                Some(Binding::Dim(d)) => d.clone(),
                Some(Binding::Static(s)) => {
                    let what = s.describe();
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            format!("`{}` is {what}, not a size", id.name),
                        )
                        .at(id.span, "used as a dim here"),
                    ));
                }
                Some(Binding::Failed) => return Err(Reported),
                // A tensor, index or function name would otherwise become a
                // fresh symbolic dim that no input fixes, failing only at run time.
                Some(_) => {
                    return Err(self.error(
                        Diagnostic::error(
                            codes::TYPE_MISMATCH,
                            format!("`{}` is not a size", id.name),
                        )
                        .at(id.span, "used as a dim here")
                        .with_help("a dim is a dim name (`B`), an int parameter, a number, or `+ - *` of those, e.g. `i: B + 1`"),
                    ))
                }
                None => Dim::sym(&id.name),
            },
            DimExpr::Add(a, b) => self.dim(a)?.add(&self.dim(b)?),
            DimExpr::Sub(a, b) => self.dim(a)?.sub(&self.dim(b)?),
            DimExpr::Mul(a, b) => self.dim(a)?.mul(&self.dim(b)?),
        })
    }

    /// Turns the value of the loss (or of an `output`) into a scalar node.
    fn scalar_output(&mut self, v: Value, span: Span, what: &str) -> R<ir::NodeId> {
        let val = self.to_val(v, span)?;
        if !val.axes.is_empty() {
            let shape =
                ir::dim::shape_string(&val.axes.iter().map(|a| a.1.clone()).collect::<Vec<_>>());
            return Err(self.error(
                Diagnostic::error(
                    codes::NOT_SCALAR,
                    format!("{what} must be a scalar, this has shape {shape}"),
                )
                .at(span, "not a scalar")
                .with_help("reduce it, e.g. `mean(i) x[i]` or `sum(i) x[i]`"),
            ));
        }
        let val = match val.ty {
            DType::Float => val,
            DType::Int => Val {
                expr: ir::Expr::unary(ir::UnOp::ToFloat, val.expr),
                ty: DType::Float,
                axes: vec![],
            },
            DType::Bool => {
                return Err(self.error(
                    Diagnostic::error(
                        codes::TYPE_MISMATCH,
                        format!("{what} must be a number, this is a bool"),
                    )
                    .at(span, "a condition")
                    .with_help("turn a condition into 0/1 with `float(c)` or `if c then 1 else 0`"),
                ))
            }
        };
        self.materialize_named(val, None, span)
    }
}

fn collect_names(e: &ast::Expr, out: &mut Vec<String>) {
    use ast::ExprKind::*;
    match &e.kind {
        Name(n) => out.push(n.clone()),
        Unary { operand, .. } => collect_names(operand, out),
        Binary { lhs, rhs, .. } => {
            collect_names(lhs, out);
            collect_names(rhs, out);
        }
        Call { args, .. } => args.iter().for_each(|a| collect_names(&a.value, out)),
        List(items) => items.iter().for_each(|i| collect_names(i, out)),
        _ => {}
    }
}

/// The name among `candidates` closest to `name`, for "did you mean" help.
pub fn closest_name(name: &str, candidates: &[String]) -> Option<String> {
    value::closest(name, candidates)
}
