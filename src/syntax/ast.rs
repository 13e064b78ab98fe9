//! The abstract syntax tree: what the text says, with a span on every node.
//!
//! The AST is a faithful, unresolved reading of one file. Names are strings,
//! nothing is checked; meaning (scopes, shapes, parameter values) belongs to
//! `elab`.

use super::source::Span;

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug)]
pub enum Item {
    Use(UseDecl),
    Fn(FnDecl),
    Loss(LossDecl),
}

#[derive(Clone, Debug)]
pub struct UseDecl {
    pub path: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct FnDecl {
    pub name: Ident,
    pub params: Vec<FnParam>,
    pub body: Block,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct FnParam {
    pub name: Ident,
    pub ty: Option<TensorTy>,
}

#[derive(Clone, Debug)]
pub struct LossDecl {
    pub name: Ident,
    pub params: Vec<ParamDecl>,
    pub body: Block,
    /// The `#` comment lines right above `loss`, without the `#`.
    pub doc: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: ParamTy,
    pub default: Option<Expr>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ParamTy {
    Float,
    Int,
    Bool,
    Str,
    Fn,
    Loss,
    Enum(Vec<String>),
    List(Box<ParamTy>),
    Optional(Box<ParamTy>),
}

#[derive(Clone, Debug)]
pub struct Block {
    pub stmts: Vec<Stmt>,
    pub result: Expr,
}

#[derive(Clone, Debug)]
pub enum Stmt {
    Input(InputDecl),
    /// `input ..loss [per layer L]`: the inputs of an inner loss parameter.
    InputsOf {
        loss: Ident,
        per_layer: Option<DimExpr>,
        span: Span,
    },
    Output {
        name: Ident,
        value: Expr,
    },
    Let(LetDecl),
    Require {
        cond: Expr,
        message: String,
        span: Span,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemTy {
    Float,
    Int,
    Bool,
}

#[derive(Clone, Debug)]
pub struct TensorTy {
    pub elem: ElemTy,
    pub dims: Vec<DimExpr>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct InputDecl {
    pub name: Ident,
    /// The declared shapes: one, or alternatives (`[B] | [B, K]`).
    pub types: Vec<TensorTy>,
    /// `= []`: the leading dim counts columns, and zero columns is allowed.
    pub variadic: bool,
    /// `?`: the input may be absent.
    pub optional: bool,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum DimExpr {
    Name(Ident),
    Lit(i64, Span),
    Add(Box<DimExpr>, Box<DimExpr>),
    Sub(Box<DimExpr>, Box<DimExpr>),
    Mul(Box<DimExpr>, Box<DimExpr>),
}

impl DimExpr {
    pub fn span(&self) -> Span {
        match self {
            DimExpr::Name(id) => id.span,
            DimExpr::Lit(_, s) => *s,
            DimExpr::Add(a, b) | DimExpr::Sub(a, b) | DimExpr::Mul(a, b) => a.span().to(b.span()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct LetDecl {
    pub name: Ident,
    pub binders: Vec<Binder>,
    pub value: Expr,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Binder {
    pub name: Ident,
    pub extent: Option<DimExpr>,
    /// `d in dims`: a static binder that unrolls over a list parameter.
    pub over: Option<Box<Expr>>,
}

#[derive(Clone, Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Neg,
    Not,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// Integer division, rounding down (ints only).
    FloorDiv,
    Rem,
    Pow,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    In,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::FloorDiv => "//",
            BinOp::Rem => "%",
            BinOp::Pow => "^",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::And => "and",
            BinOp::Or => "or",
            BinOp::In => "in",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

#[derive(Clone, Debug)]
pub struct Arg {
    pub name: Option<Ident>,
    pub value: Expr,
}

#[derive(Clone, Debug)]
pub enum IndexItem {
    At(Expr),
    Slice {
        start: Option<Expr>,
        end: Option<Expr>,
        span: Span,
    },
}

#[derive(Clone, Debug)]
pub struct MatchArm {
    /// `None` is the wildcard `_`.
    pub patterns: Vec<Option<Ident>>,
    pub body: Expr,
}

#[derive(Clone, Debug)]
pub enum ExprKind {
    Float(f64),
    Int(i64),
    Bool(bool),
    Null,
    Str(String),
    Name(String),
    List(Vec<Expr>),
    Call {
        callee: Box<Expr>,
        args: Vec<Arg>,
    },
    Index {
        base: Box<Expr>,
        items: Vec<IndexItem>,
    },
    Unary {
        op: UnOp,
        operand: Box<Expr>,
    },
    Binary {
        op: BinOp,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
    },
    If {
        cond: Box<Expr>,
        then: Box<Expr>,
        otherwise: Box<Expr>,
    },
    Match {
        scrutinee: Box<Expr>,
        arms: Vec<MatchArm>,
    },
    /// `x => body`: a function value.
    Lambda {
        param: Ident,
        body: Box<Expr>,
    },
    Reduce {
        op: RedOp,
        binders: Vec<Binder>,
        filter: Option<Box<Expr>>,
        default: Option<Box<Expr>>,
        body: Option<Box<Expr>>,
    },
}
