//! The graph IR: tensor-valued nodes in SSA form, with symbolic shapes.
//!
//! A node is an input, a comprehension (an index space, a scalar body over
//! reads of earlier nodes, and an optional reduction with an optional filter),
//! or a layout node (concat, slice, reshape). Nodes only read earlier nodes, so
//! the node order is a valid evaluation order. Every node has a dtype and a
//! symbolic shape; a comprehension's output indices range over that shape.
//!
//! Invariants (checked by `verify`): reads name earlier nodes with as many
//! indices as the node has dims; every index variable used in a body is bound
//! by its comprehension; binary arithmetic has operands of one type (the
//! elaborator inserts explicit `float(..)` conversions); index expressions are
//! ints. The IR knows no source syntax beyond spans for provenance, and no
//! runtime sizes.

pub mod contraction;
pub mod dim;
pub mod print;
pub mod verify;

pub use dim::Dim;

use crate::syntax::Span;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl NodeId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// An index variable. Ids are unique across a graph, so substitution never
/// captures; the printer shows the source name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdxVar(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Float,
    Int,
    Bool,
}

impl DType {
    pub fn letter(self) -> &'static str {
        match self {
            DType::Float => "f",
            DType::Int => "i",
            DType::Bool => "b",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Float => "float",
            DType::Int => "int",
            DType::Bool => "bool",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub kind: NodeKind,
    pub dtype: DType,
    pub shape: Vec<Dim>,
    /// The `let` (or input) that introduced the node, for readers of the IR.
    pub name: Option<String>,
    pub span: Option<Span>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// `variadic`: given as zero or more columns stacked along dim 0.
    Input {
        name: String,
        variadic: bool,
    },
    Comp(Comp),
    /// Parts joined along `axis`; all other dims agree.
    Concat {
        axis: usize,
        parts: Vec<NodeId>,
    },
    /// `src` restricted to `start .. start + shape[axis]` along `axis`.
    Slice {
        src: NodeId,
        axis: usize,
        start: Dim,
    },
    /// The elements of `src` in row-major order, in this node's shape.
    Reshape {
        src: NodeId,
    },
}

impl Node {
    /// Rewrites every node reference through `map` (old id -> new id), for
    /// passes that renumber or insert nodes.
    pub fn remap(&mut self, map: &[NodeId]) {
        let re = |e: &Expr| {
            e.map(&mut |x| match x {
                Expr::Read { node, at } => Expr::Read {
                    node: map[node.index()],
                    at,
                },
                other => other,
            })
        };
        match &mut self.kind {
            NodeKind::Input { .. } => {}
            NodeKind::Comp(c) => {
                c.body = re(&c.body);
                if let Some(f) = c.reduce.as_mut().and_then(|r| r.filter.as_mut()) {
                    *f = re(f);
                }
            }
            NodeKind::Concat { parts, .. } => parts.iter_mut().for_each(|p| *p = map[p.index()]),
            NodeKind::Slice { src, .. } | NodeKind::Reshape { src } => *src = map[src.index()],
        }
    }
}

/// `out[indices] = reduce(over | filter) body`, or `out[indices] = body`.
#[derive(Clone, Debug, PartialEq)]
pub struct Comp {
    /// One variable per output dim, in order.
    pub indices: Vec<IdxVar>,
    pub reduce: Option<Reduce>,
    pub body: Expr,
}

impl Comp {
    /// Its loop levels, outermost first: the output indices over the node's
    /// `shape`, then the reduced indices.
    pub fn levels(&self, shape: &[Dim]) -> Vec<(IdxVar, Dim)> {
        let mut levels: Vec<(IdxVar, Dim)> = self
            .indices
            .iter()
            .copied()
            .zip(shape.iter().cloned())
            .collect();
        if let Some(r) = &self.reduce {
            levels.extend(r.over.iter().cloned());
        }
        levels
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Reduce {
    pub op: RedOp,
    pub over: Vec<(IdxVar, Dim)>,
    pub filter: Option<Expr>,
    /// The value when no element passes the filter (or the range is empty).
    pub empty: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedOp {
    Sum,
    Mean,
    Max,
    Min,
    LogSumExp,
    Count,
    Any,
    All,
}

impl RedOp {
    pub fn name(self) -> &'static str {
        match self {
            RedOp::Sum => "sum",
            RedOp::Mean => "mean",
            RedOp::Max => "max",
            RedOp::Min => "min",
            RedOp::LogSumExp => "logsumexp",
            RedOp::Count => "count",
            RedOp::Any => "any",
            RedOp::All => "all",
        }
    }

    /// The value of the reduction over an empty set, when none is given.
    pub fn identity(self) -> f64 {
        match self {
            RedOp::Sum | RedOp::Mean | RedOp::Count | RedOp::Any => 0.0,
            RedOp::All => 1.0,
            RedOp::Max | RedOp::LogSumExp => f64::NEG_INFINITY,
            RedOp::Min => f64::INFINITY,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnOp {
    Neg,
    Not,
    Exp,
    Log,
    Sqrt,
    Abs,
    Relu,
    Softplus,
    Sigmoid,
    LogSigmoid,
    Tanh,
    /// Identity in value, zero in gradient.
    Detach,
    /// int or bool to float.
    ToFloat,
}

impl UnOp {
    pub fn name(self) -> &'static str {
        match self {
            UnOp::Neg => "-",
            UnOp::Not => "not",
            UnOp::Exp => "exp",
            UnOp::Log => "log",
            UnOp::Sqrt => "sqrt",
            UnOp::Abs => "abs",
            UnOp::Relu => "relu",
            UnOp::Softplus => "softplus",
            UnOp::Sigmoid => "sigmoid",
            UnOp::LogSigmoid => "log_sigmoid",
            UnOp::Tanh => "tanh",
            UnOp::Detach => "detach",
            UnOp::ToFloat => "float",
        }
    }

    /// The elementwise math functions callable by name in the language.
    pub fn from_fn_name(name: &str) -> Option<UnOp> {
        Some(match name {
            "exp" => UnOp::Exp,
            "log" => UnOp::Log,
            "sqrt" => UnOp::Sqrt,
            "abs" => UnOp::Abs,
            "relu" => UnOp::Relu,
            "softplus" => UnOp::Softplus,
            "sigmoid" => UnOp::Sigmoid,
            "log_sigmoid" => UnOp::LogSigmoid,
            "tanh" => UnOp::Tanh,
            "detach" => UnOp::Detach,
            "float" => UnOp::ToFloat,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Integer remainder (ints only).
    Rem,
    /// Integer division rounding down (ints only).
    FloorDiv,
    Pow,
    /// `torch.maximum`: a tie sends half the gradient to each side.
    Max,
    /// `torch.minimum`: a tie sends half the gradient to each side.
    Min,
    /// `clamp_min(x, lo)`: the value of `maximum`, but the gradient goes to `x`
    /// wherever `x >= lo` (as torch's clamp and F.normalize do).
    ClampMin,
    /// `clamp_max(x, hi)`: gradient to `x` wherever `x <= hi`.
    ClampMax,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
            BinOp::FloorDiv => "//",
            BinOp::Pow => "^",
            BinOp::Max => "maximum",
            BinOp::Min => "minimum",
            BinOp::ClampMin => "clamp_min",
            BinOp::ClampMax => "clamp_max",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
        }
    }

    pub fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge
        )
    }

    pub fn is_logical(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or)
    }
}

/// A scalar expression evaluated at one point of a comprehension.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Float(f64),
    Int(i64),
    Bool(bool),
    /// The current value of an index variable (an int).
    Index(IdxVar),
    /// The runtime size of a symbolic dim (an int).
    Size(Dim),
    /// An element of an earlier node; each index is an int expression.
    Read {
        node: NodeId,
        at: Vec<Expr>,
    },
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `if c then a else b`, elementwise.
    Select(Box<Expr>, Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn read(node: NodeId, at: Vec<Expr>) -> Expr {
        Expr::Read { node, at }
    }

    /// The runtime value of a dim: a constant, or `size(..)`.
    pub fn dim(d: &Dim) -> Expr {
        match d.as_lit() {
            Some(n) => Expr::Int(n),
            None => Expr::Size(d.clone()),
        }
    }

    pub fn unary(op: UnOp, e: Expr) -> Expr {
        Expr::Unary(op, Box::new(e))
    }

    pub fn binary(op: BinOp, a: Expr, b: Expr) -> Expr {
        Expr::Binary(op, Box::new(a), Box::new(b))
    }

    /// Calls `f` on every sub-expression, this one included, parents first.
    pub fn walk(&self, f: &mut impl FnMut(&Expr)) {
        f(self);
        match self {
            Expr::Read { at, .. } => at.iter().for_each(|e| e.walk(f)),
            Expr::Unary(_, a) => a.walk(f),
            Expr::Binary(_, a, b) => {
                a.walk(f);
                b.walk(f);
            }
            Expr::Select(c, a, b) => {
                c.walk(f);
                a.walk(f);
                b.walk(f);
            }
            _ => {}
        }
    }

    /// Rebuilds the expression bottom-up, letting `f` replace any node.
    pub fn map(&self, f: &mut impl FnMut(Expr) -> Expr) -> Expr {
        let rebuilt = match self {
            Expr::Read { node, at } => Expr::Read {
                node: *node,
                at: at.iter().map(|e| e.map(f)).collect(),
            },
            Expr::Unary(op, a) => Expr::Unary(*op, Box::new(a.map(f))),
            Expr::Binary(op, a, b) => Expr::Binary(*op, Box::new(a.map(f)), Box::new(b.map(f))),
            Expr::Select(c, a, b) => {
                Expr::Select(Box::new(c.map(f)), Box::new(a.map(f)), Box::new(b.map(f)))
            }
            leaf => leaf.clone(),
        };
        f(rebuilt)
    }

    /// Replaces index variables by expressions.
    pub fn subst(&self, map: &BTreeMap<IdxVar, Expr>) -> Expr {
        self.map(&mut |e| match e {
            Expr::Index(v) => map.get(&v).cloned().unwrap_or(e),
            other => other,
        })
    }

    /// The index variables this expression mentions.
    pub fn vars(&self) -> Vec<IdxVar> {
        let mut out = Vec::new();
        self.walk(&mut |e| {
            if let Expr::Index(v) = e {
                if !out.contains(v) {
                    out.push(*v);
                }
            }
        });
        out
    }

    /// The nodes this expression reads.
    pub fn reads(&self) -> Vec<NodeId> {
        let mut out = Vec::new();
        self.walk(&mut |e| {
            if let Expr::Read { node, .. } = e {
                if !out.contains(node) {
                    out.push(*node);
                }
            }
        });
        out
    }

    /// The type of the expression, given the dtypes of the nodes it reads.
    pub fn dtype(&self, graph: &Graph) -> DType {
        match self {
            Expr::Float(_) => DType::Float,
            Expr::Int(_) | Expr::Index(_) | Expr::Size(_) => DType::Int,
            Expr::Bool(_) => DType::Bool,
            Expr::Read { node, .. } => graph.node(*node).dtype,
            Expr::Unary(UnOp::Not, _) => DType::Bool,
            Expr::Unary(UnOp::Neg, a) | Expr::Unary(UnOp::Abs, a) => a.dtype(graph),
            Expr::Unary(_, _) => DType::Float,
            Expr::Binary(op, a, _) if op.is_comparison() || op.is_logical() => {
                let _ = a;
                DType::Bool
            }
            Expr::Binary(BinOp::Div, _, _) | Expr::Binary(BinOp::Pow, _, _) => DType::Float,
            Expr::Binary(_, a, _) => a.dtype(graph),
            Expr::Select(_, a, _) => a.dtype(graph),
        }
    }
}

/// Execution hints a backend may use; they never change a value.
pub type Hints = BTreeMap<String, i64>;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// The loss this graph computes, e.g. `MultipleNegativesRankingLoss`.
    pub name: String,
    pub nodes: Vec<Node>,
    /// `("loss", id)` first, then named components (`output name = ...`).
    pub outputs: Vec<(String, NodeId)>,
    /// `(input name, node)`: d loss / d input, once `grad` has run.
    pub grads: Vec<(String, NodeId)>,
    /// Source names of index variables, by `IdxVar`.
    pub index_names: Vec<String>,
    pub hints: Hints,
}

impl Graph {
    /// This graph's name, outputs, gradients, index names and hints, and no
    /// nodes: the start of a rewritten copy (cheaper than cloning the nodes
    /// only to replace them).
    pub fn without_nodes(&self, capacity: usize) -> Graph {
        Graph {
            name: self.name.clone(),
            nodes: Vec::with_capacity(capacity),
            outputs: self.outputs.clone(),
            grads: self.grads.clone(),
            index_names: self.index_names.clone(),
            hints: self.hints.clone(),
        }
    }

    /// The renaming of `b`'s loop variables (output indices, then reduced
    /// ones) to `a`'s, position by position.
    pub fn renaming(&self, a: NodeId, b: NodeId) -> BTreeMap<IdxVar, Expr> {
        let (na, nb) = (self.node(a), self.node(b));
        let (NodeKind::Comp(ca), NodeKind::Comp(cb)) = (&na.kind, &nb.kind) else {
            return BTreeMap::new();
        };
        cb.levels(&nb.shape)
            .iter()
            .zip(&ca.levels(&na.shape))
            .map(|((from, _), (to, _))| (*from, Expr::Index(*to)))
            .collect()
    }

    /// Whether comprehensions `a` and `b` run the same loops: one shape, and
    /// either no reduction or the same reduction (operation, reduced extents,
    /// empty value, and filter up to the names of the index variables).
    pub fn same_loops(&self, a: NodeId, b: NodeId) -> bool {
        let (na, nb) = (self.node(a), self.node(b));
        let (NodeKind::Comp(ca), NodeKind::Comp(cb)) = (&na.kind, &nb.kind) else {
            return false;
        };
        if na.shape != nb.shape {
            return false;
        }
        match (&ca.reduce, &cb.reduce) {
            (None, None) => true,
            (Some(ra), Some(rb)) => {
                let extents =
                    |r: &Reduce| r.over.iter().map(|(_, d)| d.clone()).collect::<Vec<_>>();
                ra.op == rb.op
                    && ra.empty.to_bits() == rb.empty.to_bits()
                    && extents(ra) == extents(rb)
                    && match (&ra.filter, &rb.filter) {
                        (None, None) => true,
                        (Some(fa), Some(fb)) => *fa == fb.subst(&self.renaming(a, b)),
                        _ => false,
                    }
            }
            _ => false,
        }
    }

    /// Sibling groups, which a backend may compute in one loop nest: runs of
    /// consecutive `fusable` nodes with the same loops as the run's first
    /// (`same_loops`), none reading another, at most `max` long (runs of one
    /// are left out).
    pub fn sibling_groups(&self, max: usize, fusable: impl Fn(NodeId) -> bool) -> Vec<Vec<NodeId>> {
        let mut out = Vec::new();
        let mut run: Vec<NodeId> = Vec::new();
        for i in 0..self.nodes.len() {
            let id = NodeId(i as u32);
            let joins = fusable(id)
                && run.first().is_some_and(|f| self.same_loops(*f, id))
                && run.len() < max
                && !self.operands(id).iter().any(|o| run.contains(o));
            if joins {
                run.push(id);
                continue;
            }
            if run.len() > 1 {
                out.push(std::mem::take(&mut run));
            }
            run.clear();
            if fusable(id) {
                run.push(id);
            }
        }
        if run.len() > 1 {
            out.push(run);
        }
        out
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn push(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        NodeId(self.nodes.len() as u32 - 1)
    }

    pub fn new_index(&mut self, name: &str) -> IdxVar {
        self.index_names.push(name.to_string());
        IdxVar(self.index_names.len() as u32 - 1)
    }

    pub fn index_name(&self, v: IdxVar) -> &str {
        self.index_names
            .get(v.0 as usize)
            .map_or("?", |s| s.as_str())
    }

    /// The input nodes, in declaration order.
    pub fn inputs(&self) -> impl Iterator<Item = (NodeId, &Node, &str, bool)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.kind {
                NodeKind::Input { name, variadic } => {
                    Some((NodeId(i as u32), n, name.as_str(), *variadic))
                }
                _ => None,
            })
    }

    pub fn loss(&self) -> NodeId {
        self.outputs[0].1
    }

    /// The nodes a node reads directly.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        match &self.node(id).kind {
            NodeKind::Input { .. } => vec![],
            NodeKind::Comp(c) => {
                let mut out = c.body.reads();
                if let Some(r) = &c.reduce {
                    if let Some(f) = &r.filter {
                        for n in f.reads() {
                            if !out.contains(&n) {
                                out.push(n);
                            }
                        }
                    }
                }
                out
            }
            NodeKind::Concat { parts, .. } => parts.clone(),
            NodeKind::Slice { src, .. } | NodeKind::Reshape { src } => vec![*src],
        }
    }

    /// Every symbolic dim name used by an input, in order of first use.
    pub fn dim_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (_, node, _, _) in self.inputs() {
            for d in &node.shape {
                for s in d.symbols() {
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
            }
        }
        out
    }
}
