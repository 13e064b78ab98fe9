//! lossc: a compiler for loss functions.
//!
//! The pipeline on one screen:
//!
//! ```text
//! .loss text ──syntax──▶ AST ──elab──▶ graph IR ──interp──▶ loss value
//!             (pest)          names, static params,   (ndarray, f32/f64)
//!                             inlining, shapes
//! ```
//!
//! `Program` holds every parsed file (the user's and the embedded standard
//! library); `compile` picks a loss, binds its parameters and elaborates it to
//! a verified `ir::Graph`; `bind::bind` checks tensors against the graph's
//! inputs; `interp::evaluate` runs it. Only the CLI (`src/bin/lossc.rs`) reads
//! files and prints; everything here returns values or diagnostics.

pub mod bind;
pub mod cuda;
pub mod data;
pub mod elab;
pub mod grad;
pub mod gradcheck;
pub mod interp;
pub mod ir;
pub mod jit;
pub mod math;
pub mod opt;
pub mod stdlib;
pub mod stream;
pub mod syntax;
pub mod tensor_io;

use elab::params::{self, ParamContext};
use elab::{LossRequest, Program};
use syntax::{codes, Diagnostic, FileId};

pub type Params = serde_json::Map<String, serde_json::Value>;

/// Finds the loss to compile: `name` in `file` (or in the standard library
/// when there is no file), or the only loss of `file`.
pub fn select_loss<'p>(
    program: &'p Program,
    file: Option<FileId>,
    name: Option<&str>,
) -> Result<(FileId, &'p syntax::ast::LossDecl), Diagnostic> {
    match (file, name) {
        (Some(f), None) => {
            let losses = &program.module(f).losses;
            match losses.len() {
                1 => Ok((f, &losses[0])),
                0 => Err(Diagnostic::error(
                    codes::NO_SUCH_LOSS,
                    format!("`{}` defines no loss", program.sources.get(f).name),
                )
                .with_help("declare one: `loss Name(params) { ... }`")),
                _ => {
                    let names: Vec<&str> = losses.iter().map(|l| l.name.name.as_str()).collect();
                    Err(Diagnostic::error(
                        codes::AMBIGUOUS_LOSS,
                        format!("`{}` defines several losses", program.sources.get(f).name),
                    )
                    .with_help(format!("pick one with --loss NAME: {}", names.join(", "))))
                }
            }
        }
        (f, Some(n)) => program.find_loss(f, n).ok_or_else(|| {
            let mut known: Vec<String> = match f {
                Some(f) => program
                    .module(f)
                    .losses
                    .iter()
                    .map(|l| l.name.name.clone())
                    .collect(),
                None => vec![],
            };
            known.extend(
                program
                    .std_losses()
                    .iter()
                    .map(|(_, l)| l.name.name.clone()),
            );
            known.sort();
            known.dedup();
            let close = elab::closest_name(n, &known);
            let help = match close {
                Some(c) => format!("did you mean `{c}`? Known losses: {}", known.join(", ")),
                None => format!("known losses: {}", known.join(", ")),
            };
            Diagnostic::error(codes::NO_SUCH_LOSS, format!("no loss named `{n}`")).with_help(help)
        }),
        (None, None) => Err(Diagnostic::error(codes::NO_SUCH_LOSS, "no loss given")
            .with_help("pass a .loss file or --loss NAME")),
    }
}

/// Binds parameters and elaborates a loss into a verified graph, for inputs
/// of unknown shape (optional inputs absent, first shape alternatives).
pub fn compile(
    program: &Program,
    file: FileId,
    decl: &syntax::ast::LossDecl,
    given: &Params,
) -> Result<ir::Graph, Vec<Diagnostic>> {
    compile_for(program, file, decl, given, &Specialize::default())
}

/// What a loss is specialised to besides its parameters.
#[derive(Clone, Debug, Default)]
pub struct Specialize<'a> {
    /// The tensors it will run on: their shapes pick optional inputs
    /// (`present(x)`), shape alternatives (`form(x)`) and static sizes.
    pub tensors: Option<&'a tensor_io::TensorMap>,
    /// Seed of random choices in the program (`sample`, e.g. Matryoshka's
    /// `n_dims_per_step`).
    pub seed: u64,
    /// Sizes assumed for static queries when no tensors are given (`--dims`).
    pub dims: std::collections::BTreeMap<String, i64>,
}

/// As `compile`, specialised to the tensors it will run on, a seed and sizes.
pub fn compile_for(
    program: &Program,
    file: FileId,
    decl: &syntax::ast::LossDecl,
    given: &Params,
    spec: &Specialize,
) -> Result<ir::Graph, Vec<Diagnostic>> {
    let fns = program.visible_fns(file);
    let cx = ParamContext { fns: &fns };
    let params = params::bind(decl, file, given, &cx, false)?;
    let shapes = spec.tensors.map(input_shapes);
    let req = LossRequest {
        file,
        decl,
        params,
        given: shapes.as_ref(),
        seed: spec.seed,
        default_sizes: spec.dims.clone(),
    };
    elab::elaborate(program, &req)
}

/// The shape of every tensor of a file, by input name (`input.` stripped).
pub fn input_shapes(tensors: &tensor_io::TensorMap) -> elab::GivenShapes {
    tensors
        .iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("input.").unwrap_or(k).to_string(),
                t.shape.clone(),
            )
        })
        .collect()
}

/// Checks every loss of a file with its default parameters (placeholders
/// where a parameter has none); returns every diagnostic found.
pub fn check_file(program: &Program, file: FileId) -> Vec<Diagnostic> {
    let mut diags = program.load_errors(Some(file));
    let fns = program.visible_fns(file);
    let cx = ParamContext { fns: &fns };
    for decl in &program.module(file).losses {
        match params::bind(decl, file, &Params::new(), &cx, true) {
            Ok(params) => {
                if let Err(mut d) = elab::elaborate(
                    program,
                    &LossRequest {
                        file,
                        decl,
                        params,
                        given: None,
                        seed: 0,
                        default_sizes: Default::default(),
                    },
                ) {
                    diags.append(&mut d);
                }
            }
            Err(mut d) => diags.append(&mut d),
        }
    }
    diags
}

/// The gradients of an evaluation as named tensors, one per input the user
/// gave: `anchor`, and for a variadic input one per column it was given as
/// (`negative_1`, `negative_2`, ...). Values are in the evaluated dtype.
pub fn gradient_tensors<F: interp::Real>(
    graph: &ir::Graph,
    bound: &bind::Bound,
    eval: &interp::Evaluation<F>,
) -> Vec<(String, tensor_io::HostTensor)> {
    gradients(graph, bound, |node| match &eval.values[node.index()] {
        interp::Tensor::F(a) => Some((
            a.shape().to_vec(),
            a.as_slice()
                .map_or_else(|| a.iter().copied().collect(), |s| s.to_vec()),
        )),
        _ => None,
    })
}

/// `gradient_tensors`, moving the values out of the evaluation instead of
/// copying them (one gradient tensor per input: no copy at all).
pub fn into_gradient_tensors<F: interp::Real>(
    graph: &ir::Graph,
    bound: &bind::Bound,
    mut eval: interp::Evaluation<F>,
) -> Vec<(String, tensor_io::HostTensor)> {
    gradients(graph, bound, |node| {
        let empty = interp::Tensor::I(Default::default());
        match std::mem::replace(&mut eval.values[node.index()], empty) {
            interp::Tensor::F(a) => {
                let shape = a.shape().to_vec();
                let a = if a.is_standard_layout() {
                    a
                } else {
                    a.as_standard_layout().into_owned()
                };
                let (data, offset) = a.into_raw_vec_and_offset();
                match offset {
                    Some(0) | None => Some((shape, data)),
                    Some(_) => None,
                }
            }
            _ => None,
        }
    })
}

fn gradients<F: interp::Real>(
    graph: &ir::Graph,
    bound: &bind::Bound,
    mut values: impl FnMut(ir::NodeId) -> Option<(Vec<usize>, Vec<F>)>,
) -> Vec<(String, tensor_io::HostTensor)> {
    let mut out = Vec::new();
    for (name, node) in &graph.grads {
        let Some(input) = bound.inputs.iter().find(|i| &i.name == name) else {
            continue;
        };
        let Some((shape, data)) = values(*node) else {
            continue;
        };
        let keys: Vec<String> = input
            .columns
            .iter()
            .map(|k| k.strip_prefix("input.").unwrap_or(k).to_string())
            .collect();
        if input.split_columns && shape.first() == Some(&keys.len()) && !keys.is_empty() {
            let per = data.len() / keys.len();
            for (c, k) in keys.iter().enumerate() {
                let piece = data[c * per..(c + 1) * per].to_vec();
                out.push((k.clone(), host_tensor(shape[1..].to_vec(), piece)));
            }
        } else if let Some(key) = keys.first() {
            out.push((key.clone(), host_tensor(shape, data)));
        }
    }
    out
}

/// A host tensor of the evaluated dtype, without a copy.
fn host_tensor<F: interp::Real>(shape: Vec<usize>, data: Vec<F>) -> tensor_io::HostTensor {
    let any: Box<dyn std::any::Any> = Box::new(data);
    match any.downcast::<Vec<f32>>() {
        Ok(v) => tensor_io::HostTensor::f32(shape, *v),
        Err(any) => match any.downcast::<Vec<f64>>() {
            Ok(v) => tensor_io::HostTensor::f64(shape, *v),
            Err(_) => tensor_io::HostTensor::f64(shape, Vec::new()),
        },
    }
}

/// The optimised forward-plus-gradient program of a forward graph.
pub fn differentiate(forward: &ir::Graph) -> (ir::Graph, opt::Report) {
    let (fwd, mut report) = opt::optimize(forward);
    let (full, r2) = opt::optimize_gradient(&grad::grad(&fwd));
    for (k, v) in r2.fired {
        *report.fired.entry(k).or_insert(0) += v;
    }
    (full, report)
}

/// One row of the standard library's catalogue (`lossc list`).
pub struct LibraryEntry {
    pub name: String,
    pub file: String,
    /// The first sentence of the doc comment.
    pub summary: String,
    /// `name: [B, D]` for every input (`..loss` for a wrapper's inner inputs).
    pub inputs: Vec<String>,
    /// `name: type = default` for every parameter.
    pub params: Vec<String>,
}

/// Every loss of the standard library, sorted by name.
pub fn library_catalogue(program: &Program) -> Vec<LibraryEntry> {
    use syntax::ast::{DimExpr, ElemTy, Stmt};
    fn dim(d: &DimExpr) -> String {
        match d {
            DimExpr::Name(n) => n.name.clone(),
            DimExpr::Lit(n, _) => n.to_string(),
            DimExpr::Add(a, b) => format!("{} + {}", dim(a), dim(b)),
            DimExpr::Sub(a, b) => format!("{} - {}", dim(a), dim(b)),
            DimExpr::Mul(a, b) => format!("{}*{}", dim(a), dim(b)),
        }
    }
    let mut out = Vec::new();
    for (file, decl) in program.std_losses() {
        let inputs = decl
            .body
            .stmts
            .iter()
            .filter_map(|s| match s {
                Stmt::Input(i) => {
                    let shapes: Vec<String> = i
                        .types
                        .iter()
                        .map(|t| {
                            let elem = match t.elem {
                                ElemTy::Float => "",
                                ElemTy::Int => "int",
                                ElemTy::Bool => "bool",
                            };
                            format!(
                                "{elem}[{}]",
                                t.dims.iter().map(dim).collect::<Vec<_>>().join(", ")
                            )
                        })
                        .collect();
                    let suffix = if i.variadic {
                        " (0+ columns)"
                    } else if i.optional {
                        " (optional)"
                    } else {
                        ""
                    };
                    Some(format!("{}: {}{suffix}", i.name.name, shapes.join(" | ")))
                }
                Stmt::InputsOf {
                    loss, per_layer, ..
                } => Some(match per_layer {
                    Some(l) => format!(
                        "the inputs of the inner {}, each embedding x as all_layers_x [{}, ...]",
                        loss.name,
                        dim(l)
                    ),
                    None => format!("the inputs of the inner {}", loss.name),
                }),
                _ => None,
            })
            .collect();
        let params = decl
            .params
            .iter()
            .map(|p| {
                let ty = elab::params::type_name(&p.ty);
                let default = p
                    .default
                    .as_ref()
                    .map(|d| format!(" = {}", program.sources.snippet(d.span)))
                    .unwrap_or_default();
                format!("{}: {ty}{default}", p.name.name)
            })
            .collect();
        let doc = decl
            .doc
            .strip_prefix(&format!("{}: ", decl.name.name))
            .unwrap_or(&decl.doc);
        let summary = doc.split(". ").next().unwrap_or("").replace('\n', " ");
        let summary = if summary.is_empty() || summary.ends_with('.') {
            summary
        } else {
            format!("{summary}.")
        };
        let file = program
            .sources
            .get(file)
            .name
            .trim_start_matches("<std>/")
            .to_string();
        out.push(LibraryEntry {
            name: decl.name.name.clone(),
            file,
            summary,
            inputs,
            params,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}
