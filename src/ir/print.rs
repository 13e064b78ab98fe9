//! The IR's text form: one line per node, stable and compact. This is the
//! format snapshot tests pin, so changes here are deliberate.
//!
//! ```text
//! %5[i, j] = 20 * %4[i, j] : f[B, B*K + B]  # s
//! %6[i] = logsumexp(j) %5[i, j] : f[B]
//! loss = %8
//! ```

use super::dim::shape_string;
use super::*;
use std::collections::HashMap;
use std::fmt::Write;

pub fn print_graph(graph: &Graph) -> String {
    print_graph_annotated(graph, &|_, _| None)
}

/// The text form with a note after chosen nodes (e.g. their source span).
pub fn print_graph_annotated(
    graph: &Graph,
    annotate: &dyn Fn(NodeId, &Node) -> Option<String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "loss {}", graph.name);
    for (k, v) in &graph.hints {
        let _ = writeln!(out, "hint {k} = {v}");
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        let id = NodeId(i as u32);
        match annotate(id, node) {
            Some(note) => {
                let _ = writeln!(out, "{}  @ {note}", print_node(graph, id, node));
            }
            None => {
                let _ = writeln!(out, "{}", print_node(graph, id, node));
            }
        }
    }
    for (name, id) in &graph.outputs {
        let _ = writeln!(out, "{name} = %{}", id.0);
    }
    for (name, id) in &graph.grads {
        let _ = writeln!(out, "grad {name} = %{}", id.0);
    }
    out
}

pub fn print_node(graph: &Graph, id: NodeId, node: &Node) -> String {
    let ty = format!("{}{}", node.dtype.letter(), shape_string(&node.shape));
    let names = VarNames::for_node(graph, node);
    let lhs_rhs = match &node.kind {
        NodeKind::Input { name, variadic } => {
            let dots = if *variadic { ".." } else { "" };
            format!("%{} = input {dots}{name}", id.0)
        }
        NodeKind::Comp(c) => {
            let idx = if c.indices.is_empty() {
                String::new()
            } else {
                let v: Vec<&str> = c.indices.iter().map(|v| names.get(*v)).collect();
                format!("[{}]", v.join(", "))
            };
            let rhs = match &c.reduce {
                None => expr_string(&c.body, &names, 0),
                Some(r) => reduce_string(r, &c.body, &names),
            };
            format!("%{}{idx} = {rhs}", id.0)
        }
        NodeKind::Concat { axis, parts } => {
            let p: Vec<String> = parts.iter().map(|p| format!("%{}", p.0)).collect();
            format!("%{} = concat(axis={axis}) {}", id.0, p.join(", "))
        }
        NodeKind::Slice { src, axis, start } => {
            let end = start.add(&node.shape[*axis]);
            format!("%{} = slice(axis={axis}, {start}..{end}) %{}", id.0, src.0)
        }
        NodeKind::Reshape { src } => format!("%{} = reshape %{}", id.0, src.0),
    };
    match &node.name {
        Some(n) if !matches!(node.kind, NodeKind::Input { .. }) => {
            format!("{lhs_rhs} : {ty}  # {n}")
        }
        _ => format!("{lhs_rhs} : {ty}"),
    }
}

fn reduce_string(r: &Reduce, body: &Expr, names: &VarNames) -> String {
    // Reduced variables with their ranges: `sum(k: D)`, `sum(t: 16)`.
    let vars: Vec<String> = r
        .over
        .iter()
        .map(|(v, d)| format!("{}: {d}", names.get(*v)))
        .collect();
    let mut head = format!("{}({}", r.op.name(), vars.join(", "));
    if let Some(f) = &r.filter {
        let _ = write!(head, " | {}", expr_string(f, names, 0));
    }
    if r.empty != r.op.identity() && !(r.empty.is_nan() && r.op.identity().is_nan()) {
        let _ = write!(head, ", else {}", float_string(r.empty));
    }
    head.push(')');
    if r.op == RedOp::Count {
        head
    } else {
        format!("{head} {}", expr_string(body, names, PREC_MUL))
    }
}

/// Per-node display names of index variables: the source name, suffixed with
/// a number when two variables of one node share it.
pub struct VarNames {
    names: HashMap<IdxVar, String>,
}

impl VarNames {
    pub fn for_node(graph: &Graph, node: &Node) -> VarNames {
        let mut order: Vec<IdxVar> = Vec::new();
        if let NodeKind::Comp(c) = &node.kind {
            order.extend(&c.indices);
            if let Some(r) = &c.reduce {
                order.extend(r.over.iter().map(|(v, _)| *v));
                if let Some(f) = &r.filter {
                    order.extend(f.vars());
                }
            }
            order.extend(c.body.vars());
        }
        let mut names = HashMap::new();
        let mut used: HashMap<String, usize> = HashMap::new();
        for v in order {
            if names.contains_key(&v) {
                continue;
            }
            let base = graph.index_name(v).to_string();
            let n = used.entry(base.clone()).or_insert(0);
            *n += 1;
            let shown = if *n == 1 { base } else { format!("{base}{n}") };
            names.insert(v, shown);
        }
        VarNames { names }
    }

    pub fn get(&self, v: IdxVar) -> &str {
        self.names.get(&v).map_or("?", |s| s.as_str())
    }
}

const PREC_IF: u8 = 0;
const PREC_OR: u8 = 1;
const PREC_AND: u8 = 2;
const PREC_NOT: u8 = 3;
const PREC_CMP: u8 = 4;
const PREC_ADD: u8 = 5;
const PREC_MUL: u8 = 6;
const PREC_NEG: u8 = 7;
const PREC_POW: u8 = 8;

pub fn float_string(x: f64) -> String {
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x.is_nan() {
        return "nan".into();
    }
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e15) {
        format!("{x:e}")
    } else if x == x.trunc() {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Prints `e` with the fewest parentheses for a context of precedence `ctx`.
pub fn expr_string(e: &Expr, names: &VarNames, ctx: u8) -> String {
    let (prec, text) = match e {
        Expr::Float(x) => (if *x < 0.0 { PREC_NEG } else { 9 }, float_string(*x)),
        Expr::Int(n) => (if *n < 0 { PREC_NEG } else { 9 }, n.to_string()),
        Expr::Bool(b) => (9, b.to_string()),
        Expr::Index(v) => (9, names.get(*v).to_string()),
        Expr::Size(d) => (9, format!("size({d})")),
        Expr::Read { node, at } => {
            if at.is_empty() {
                (9, format!("%{}", node.0))
            } else {
                let idx: Vec<String> = at.iter().map(|a| expr_string(a, names, 0)).collect();
                (9, format!("%{}[{}]", node.0, idx.join(", ")))
            }
        }
        Expr::Unary(UnOp::Neg, a) => (PREC_NEG, format!("-{}", expr_string(a, names, PREC_NEG))),
        Expr::Unary(UnOp::Not, a) => (PREC_NOT, format!("not {}", expr_string(a, names, PREC_NOT))),
        Expr::Unary(op, a) => (9, format!("{}({})", op.name(), expr_string(a, names, 0))),
        Expr::Binary(op @ (BinOp::Max | BinOp::Min | BinOp::ClampMin | BinOp::ClampMax), a, b) => (
            9,
            format!(
                "{}({}, {})",
                op.symbol(),
                expr_string(a, names, 0),
                expr_string(b, names, 0)
            ),
        ),
        Expr::Binary(op, a, b) => {
            let p = match op {
                BinOp::Or => PREC_OR,
                BinOp::And => PREC_AND,
                BinOp::Add | BinOp::Sub => PREC_ADD,
                BinOp::Mul | BinOp::Div | BinOp::Rem | BinOp::FloorDiv => PREC_MUL,
                BinOp::Pow => PREC_POW,
                _ => PREC_CMP,
            };
            // Left-associative: the right operand needs one level more.
            let (lp, rp) = if *op == BinOp::Pow {
                (p + 1, p)
            } else {
                (p, p + 1)
            };
            let text = format!(
                "{} {} {}",
                expr_string(a, names, lp),
                op.symbol(),
                expr_string(b, names, rp)
            );
            (p, text)
        }
        Expr::Select(c, a, b) => (
            PREC_IF,
            format!(
                "if {} then {} else {}",
                expr_string(c, names, 0),
                expr_string(a, names, 0),
                expr_string(b, names, 0)
            ),
        ),
    };
    if prec < ctx {
        format!("({text})")
    } else {
        text
    }
}
