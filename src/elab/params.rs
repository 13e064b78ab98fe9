//! Static parameters: their values, and binding them from JSON.
//!
//! A loss is specialised per parameter set, so parameters are plain values at
//! elaboration time. Binding checks every given key against the declaration
//! and every value against its declared type; each problem is a diagnostic
//! that names the parameter and lists the valid names or choices.

use crate::syntax::ast::{ExprKind, LossDecl, ParamTy};
use crate::syntax::{codes, Diagnostic, FileId};
use serde_json::Value as Json;
use std::fmt;
use std::rc::Rc;

#[derive(Clone, Debug, PartialEq)]
pub enum Static {
    Float(f64),
    Int(i64),
    Bool(bool),
    Null,
    Str(String),
    /// An enum choice, with the choices it was checked against.
    Sym {
        value: String,
        choices: Rc<Vec<String>>,
    },
    /// A function choice, by name.
    Func(String),
    /// An inner loss for wrapper losses: a class name and its parameters.
    Loss {
        name: String,
        params: serde_json::Map<String, Json>,
    },
    List(Vec<Static>),
}

impl Static {
    pub fn describe(&self) -> &'static str {
        match self {
            Static::Float(_) => "a float",
            Static::Int(_) => "an int",
            Static::Bool(_) => "a bool",
            Static::Null => "null",
            Static::Str(_) => "a string",
            Static::Sym { .. } => "a choice",
            Static::Func(_) => "a function",
            Static::Loss { .. } => "a loss",
            Static::List(_) => "a list",
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Static::Float(x) => Some(*x),
            Static::Int(n) => Some(*n as f64),
            _ => None,
        }
    }
}

impl fmt::Display for Static {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Static::Float(x) => write!(f, "{x}"),
            Static::Int(n) => write!(f, "{n}"),
            Static::Bool(b) => write!(f, "{b}"),
            Static::Null => write!(f, "null"),
            Static::Str(s) => write!(f, "\"{s}\""),
            Static::Sym { value, .. } | Static::Func(value) => write!(f, "{value}"),
            Static::Loss { name, .. } => write!(f, "{name}(...)"),
            Static::List(items) => {
                let parts: Vec<String> = items.iter().map(|i| i.to_string()).collect();
                write!(f, "[{}]", parts.join(", "))
            }
        }
    }
}

pub fn type_name(ty: &ParamTy) -> String {
    match ty {
        ParamTy::Float => "float".into(),
        ParamTy::Int => "int".into(),
        ParamTy::Bool => "bool".into(),
        ParamTy::Str => "string".into(),
        ParamTy::Fn => "fn".into(),
        ParamTy::Loss => "loss".into(),
        ParamTy::Enum(c) => format!("one of {{{}}}", c.join(", ")),
        ParamTy::List(t) => format!("[{}]", type_name(t)),
        ParamTy::Optional(t) => format!("{}?", type_name(t)),
    }
}

/// What a parameter's value must be checked against besides its type: the
/// function names a `fn` parameter may take.
pub struct ParamContext<'a> {
    pub fns: &'a [String],
}

/// Converts a JSON value to a parameter value of type `ty`.
pub fn from_json(v: &Json, ty: &ParamTy, cx: &ParamContext) -> Result<Static, String> {
    match (ty, v) {
        (ParamTy::Optional(_), Json::Null) => Ok(Static::Null),
        (ParamTy::Optional(t), _) => from_json(v, t, cx),
        (ParamTy::Float, Json::Number(n)) => n
            .as_f64()
            .map(Static::Float)
            .ok_or_else(|| "a number out of range".into()),
        (ParamTy::Int, Json::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Static::Int(i)),
            (None, Some(x)) if x.fract() == 0.0 && x.abs() < 9e15 => Ok(Static::Int(x as i64)),
            _ => Err(format!("an int, got {n}")),
        },
        (ParamTy::Bool, Json::Bool(b)) => Ok(Static::Bool(*b)),
        (ParamTy::Str, Json::String(s)) => Ok(Static::Str(s.clone())),
        (ParamTy::Enum(choices), Json::String(s)) => {
            if choices.contains(s) {
                Ok(Static::Sym {
                    value: s.clone(),
                    choices: Rc::new(choices.clone()),
                })
            } else {
                Err(format!("one of {}, got \"{s}\"", choices.join(", ")))
            }
        }
        (ParamTy::Fn, Json::String(s)) => {
            if cx.fns.contains(s) {
                Ok(Static::Func(s.clone()))
            } else {
                Err(format!(
                    "a function name such as {}, got \"{s}\"",
                    cx.fns.join(", ")
                ))
            }
        }
        (ParamTy::Loss, Json::String(s)) => Ok(Static::Loss {
            name: s.clone(),
            params: Default::default(),
        }),
        (ParamTy::Loss, Json::Object(o)) => {
            let name = o
                .get("st_class")
                .or_else(|| o.get("loss"))
                .and_then(|n| n.as_str());
            let params = o
                .get("params")
                .and_then(|p| p.as_object())
                .cloned()
                .unwrap_or_default();
            match name {
                Some(n) => Ok(Static::Loss {
                    name: n.to_string(),
                    params,
                }),
                None => Err("a loss: {\"st_class\": NAME, \"params\": {...}}".into()),
            }
        }
        (ParamTy::List(t), Json::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(from_json(item, t, cx).map_err(|e| format!("element {i}: {e}"))?);
            }
            Ok(Static::List(out))
        }
        (t, other) => Err(format!("{}, got {}", type_name(t), json_kind(other))),
    }
}

fn json_kind(v: &Json) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => format!("{b}"),
        Json::Number(n) => format!("{n}"),
        Json::String(s) => format!("\"{s}\""),
        Json::Array(_) => "a list".into(),
        Json::Object(_) => "an object".into(),
    }
}

/// Evaluates a default written in the declaration (a literal, a name of a
/// choice or function, a list, null, or a negated number).
pub fn default_value(
    e: &crate::syntax::ast::Expr,
    ty: &ParamTy,
    cx: &ParamContext,
) -> Result<Static, String> {
    let json =
        literal_json(e).ok_or("a default must be a literal (number, bool, name, list or null)")?;
    from_json(&json, ty, cx)
}

fn literal_json(e: &crate::syntax::ast::Expr) -> Option<Json> {
    Some(match &e.kind {
        ExprKind::Float(x) => serde_json::Number::from_f64(*x).map(Json::Number)?,
        ExprKind::Int(n) => Json::from(*n),
        ExprKind::Bool(b) => Json::Bool(*b),
        ExprKind::Null => Json::Null,
        ExprKind::Str(s) | ExprKind::Name(s) => Json::String(s.clone()),
        ExprKind::List(items) => {
            Json::Array(items.iter().map(literal_json).collect::<Option<_>>()?)
        }
        ExprKind::Unary {
            op: crate::syntax::ast::UnOp::Neg,
            operand,
        } => match literal_json(operand)? {
            Json::Number(n) if n.is_i64() => Json::from(-n.as_i64()?),
            Json::Number(n) => serde_json::Number::from_f64(-n.as_f64()?).map(Json::Number)?,
            _ => return None,
        },
        _ => return None,
    })
}

/// A value of the right type for checking a loss whose parameter has no
/// default (used by `lossc check`).
pub fn placeholder(ty: &ParamTy, cx: &ParamContext) -> Static {
    match ty {
        ParamTy::Float => Static::Float(1.0),
        ParamTy::Int => Static::Int(1),
        ParamTy::Bool => Static::Bool(false),
        ParamTy::Str => Static::Str(String::new()),
        ParamTy::Fn => Static::Func(cx.fns.first().cloned().unwrap_or_default()),
        ParamTy::Loss => Static::Loss {
            name: "CosineSimilarityLoss".into(),
            params: Default::default(),
        },
        ParamTy::Enum(c) => Static::Sym {
            value: c[0].clone(),
            choices: Rc::new(c.clone()),
        },
        // One element, so that `require len(x) > 0` holds while checking.
        ParamTy::List(t) => Static::List(vec![placeholder(t, cx)]),
        ParamTy::Optional(_) => Static::Null,
    }
}

/// Binds a loss's parameters from JSON: every declared parameter gets the
/// given value or its default; unknown keys and ill-typed values are errors.
pub fn bind(
    decl: &LossDecl,
    file: FileId,
    given: &serde_json::Map<String, Json>,
    cx: &ParamContext,
    placeholders: bool,
) -> Result<Vec<(String, Static)>, Vec<Diagnostic>> {
    let _ = file;
    let mut diags = Vec::new();
    let valid: Vec<String> = decl.params.iter().map(|p| p.name.name.clone()).collect();
    for key in given.keys() {
        if !valid.contains(key) {
            let list = if valid.is_empty() {
                "it takes no parameters".to_string()
            } else {
                format!("valid parameters: {}", valid.join(", "))
            };
            diags.push(
                Diagnostic::error(
                    codes::UNKNOWN_PARAM,
                    format!("`{}` has no parameter `{key}`", decl.name.name),
                )
                .at(decl.name.span, "this loss")
                .with_help(list),
            );
        }
    }
    let mut out = Vec::new();
    for p in &decl.params {
        let name = &p.name.name;
        let value = match (given.get(name), &p.default) {
            (Some(v), _) => from_json(v, &p.ty, cx).map_err(|e| {
                // A string for a choice parameter that is not one of its choices.
                let base = match &p.ty {
                    ParamTy::Optional(t) => t.as_ref(),
                    t => t,
                };
                let choices = match base {
                    ParamTy::Enum(c) => Some(c.clone()),
                    ParamTy::Fn => Some(cx.fns.to_vec()),
                    _ => None,
                };
                let mut d = match (v.as_str(), &choices) {
                    (Some(_), Some(_)) => Diagnostic::error(
                        codes::BAD_CHOICE,
                        format!("parameter `{name}` expects {e}"),
                    ),
                    _ => Diagnostic::error(
                        codes::PARAM_TYPE,
                        format!("parameter `{name}` expects {e}"),
                    ),
                };
                d = d.at(p.span, format!("declared as {}", type_name(&p.ty)));
                if let (Some(given), Some(c)) = (v.as_str(), &choices) {
                    if let Some(close) = crate::elab::closest_name(given, c) {
                        d = d.with_help(format!("did you mean `{close}`?"));
                    }
                }
                d
            }),
            (None, Some(d)) => default_value(d, &p.ty, cx).map_err(|e| {
                // A name that is not one of the choices is the same mistake
                // as a given value that is not: BAD_CHOICE, with a suggestion.
                let base = match &p.ty {
                    ParamTy::Optional(t) => t.as_ref(),
                    t => t,
                };
                let choices = match base {
                    ParamTy::Enum(c) => Some(c.clone()),
                    ParamTy::Fn => Some(cx.fns.to_vec()),
                    _ => None,
                };
                let written = match &d.kind {
                    ExprKind::Name(s) | ExprKind::Str(s) => Some(s.as_str()),
                    _ => None,
                };
                let code = match (written, &choices) {
                    (Some(_), Some(_)) => codes::BAD_CHOICE,
                    _ => codes::PARAM_TYPE,
                };
                let mut diag = Diagnostic::error(
                    code,
                    format!("the default of `{name}` is not valid: expected {e}"),
                )
                .at(d.span, "this default");
                if let (Some(w), Some(c)) = (written, &choices) {
                    if let Some(close) = crate::elab::closest_name(w, c) {
                        diag = diag.with_help(format!("did you mean `{close}`?"));
                    }
                }
                diag
            }),
            (None, None) if placeholders => Ok(placeholder(&p.ty, cx)),
            (None, None) => Err(Diagnostic::error(
                codes::MISSING_PARAM,
                format!(
                    "parameter `{name}` of `{}` has no default and was not given",
                    decl.name.name
                ),
            )
            .at(p.span, "declared here")
            .with_help(format!(
                "pass it with --params '{{\"{name}\": ...}}' or --set {name}=VALUE"
            ))),
        };
        match value {
            Ok(v) => out.push((name.clone(), v)),
            Err(d) => diags.push(d),
        }
    }
    if diags.is_empty() {
        Ok(out)
    } else {
        Err(diags)
    }
}
