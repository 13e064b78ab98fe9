//! Expression rewrites as named data: each rule has a name (reported by
//! `lossc ir --explain`) and a function that rewrites one expression node or
//! declines. Rules never change a value (up to floating-point rounding of
//! constant folding) and never introduce new reads.

use crate::ir::{BinOp, Expr, UnOp};

pub struct Rule {
    pub name: &'static str,
    pub apply: fn(&Expr) -> Option<Expr>,
}

fn is_f(e: &Expr, k: f64) -> bool {
    matches!(e, Expr::Float(x) if *x == k)
}

fn b(e: &Expr) -> Box<Expr> {
    Box::new(e.clone())
}

/// Algebraic simplification and constant folding.
pub const SIMPLIFY: &[Rule] = &[
    Rule {
        name: "fold-unary",
        apply: fold_unary,
    },
    Rule {
        name: "fold-binary",
        apply: fold_binary,
    },
    Rule {
        name: "add-zero",
        apply: |e| match e {
            Expr::Binary(BinOp::Add, a, z) | Expr::Binary(BinOp::Add, z, a) if is_f(z, 0.0) => {
                Some(a.as_ref().clone())
            }
            _ => None,
        },
    },
    Rule {
        name: "sub-zero",
        apply: |e| match e {
            Expr::Binary(BinOp::Sub, a, z) if is_f(z, 0.0) => Some(a.as_ref().clone()),
            Expr::Binary(BinOp::Sub, z, a) if is_f(z, 0.0) => {
                Some(Expr::unary(UnOp::Neg, a.as_ref().clone()))
            }
            _ => None,
        },
    },
    Rule {
        name: "mul-one",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, a, o) | Expr::Binary(BinOp::Mul, o, a) if is_f(o, 1.0) => {
                Some(a.as_ref().clone())
            }
            _ => None,
        },
    },
    // Inputs are checked finite, so 0 * x is 0.
    Rule {
        name: "mul-zero",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, _, z) | Expr::Binary(BinOp::Mul, z, _) if is_f(z, 0.0) => {
                Some(Expr::Float(0.0))
            }
            _ => None,
        },
    },
    Rule {
        name: "div-one",
        apply: |e| match e {
            Expr::Binary(BinOp::Div, a, o) if is_f(o, 1.0) => Some(a.as_ref().clone()),
            _ => None,
        },
    },
    Rule {
        name: "zero-div",
        apply: |e| match e {
            Expr::Binary(BinOp::Div, z, _) if is_f(z, 0.0) => Some(Expr::Float(0.0)),
            _ => None,
        },
    },
    Rule {
        name: "neg-neg",
        apply: |e| match e {
            Expr::Unary(UnOp::Neg, a) => match a.as_ref() {
                Expr::Unary(UnOp::Neg, x) => Some(x.as_ref().clone()),
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "neg-zero",
        apply: |e| match e {
            Expr::Unary(UnOp::Neg, z) if is_f(z, 0.0) => Some(Expr::Float(0.0)),
            _ => None,
        },
    },
    // (-a) * b = -(a * b), a * (-b) = -(a * b): negations float up and cancel.
    Rule {
        name: "mul-neg",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, a, x) => match (a.as_ref(), x.as_ref()) {
                (Expr::Unary(UnOp::Neg, p), q) | (q, Expr::Unary(UnOp::Neg, p)) => {
                    Some(Expr::unary(
                        UnOp::Neg,
                        Expr::binary(BinOp::Mul, p.as_ref().clone(), q.clone()),
                    ))
                }
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "sub-neg",
        apply: |e| match e {
            Expr::Binary(BinOp::Sub, a, n) => match n.as_ref() {
                Expr::Unary(UnOp::Neg, x) => Some(Expr::binary(
                    BinOp::Add,
                    a.as_ref().clone(),
                    x.as_ref().clone(),
                )),
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "add-neg",
        apply: |e| match e {
            Expr::Binary(BinOp::Add, a, n) => match n.as_ref() {
                Expr::Unary(UnOp::Neg, x) => Some(Expr::binary(
                    BinOp::Sub,
                    a.as_ref().clone(),
                    x.as_ref().clone(),
                )),
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "add-self",
        apply: |e| match e {
            Expr::Binary(BinOp::Add, a, c) if a == c && !matches!(a.as_ref(), Expr::Float(_)) => {
                Some(Expr::binary(
                    BinOp::Mul,
                    Expr::Float(2.0),
                    a.as_ref().clone(),
                ))
            }
            _ => None,
        },
    },
    // c1 * (c2 * x) = (c1 c2) * x; constants move left.
    Rule {
        name: "mul-const-assoc",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, c1, rest) => match (c1.as_ref(), rest.as_ref()) {
                (Expr::Float(p), Expr::Binary(BinOp::Mul, c2, x)) => match c2.as_ref() {
                    Expr::Float(q) => Some(Expr::binary(
                        BinOp::Mul,
                        Expr::Float(p * q),
                        x.as_ref().clone(),
                    )),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "mul-const-left",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, x, c)
                if matches!(c.as_ref(), Expr::Float(_))
                    && !matches!(x.as_ref(), Expr::Float(_)) =>
            {
                Some(Expr::Binary(BinOp::Mul, b(c), b(x)))
            }
            _ => None,
        },
    },
    Rule {
        name: "select-const",
        apply: |e| match e {
            Expr::Select(c, a, x) => match c.as_ref() {
                Expr::Bool(true) => Some(a.as_ref().clone()),
                Expr::Bool(false) => Some(x.as_ref().clone()),
                _ if a == x => Some(a.as_ref().clone()),
                _ => None,
            },
            _ => None,
        },
    },
    // (if c then a else 0) * x = if c then a * x else 0
    Rule {
        name: "select-zero-mul",
        apply: |e| match e {
            Expr::Binary(BinOp::Mul, l, r) => match (l.as_ref(), r.as_ref()) {
                (Expr::Select(c, a, z), x) | (x, Expr::Select(c, a, z)) if is_f(z, 0.0) => {
                    Some(Expr::Select(
                        c.clone(),
                        Box::new(Expr::binary(BinOp::Mul, a.as_ref().clone(), x.clone())),
                        b(z),
                    ))
                }
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "and-true",
        apply: |e| match e {
            Expr::Binary(BinOp::And, t, x) | Expr::Binary(BinOp::And, x, t)
                if matches!(t.as_ref(), Expr::Bool(true)) =>
            {
                Some(x.as_ref().clone())
            }
            _ => None,
        },
    },
    // `false and x` is false, `true or x` true, where `x` cannot fail (it
    // is evaluated, and could raise an error).
    Rule {
        name: "and-false",
        apply: |e| match e {
            Expr::Binary(BinOp::And, f, x)
                if matches!(f.as_ref(), Expr::Bool(false)) && super::factor::infallible(x) =>
            {
                Some(Expr::Bool(false))
            }
            Expr::Binary(BinOp::Or, t, x)
                if matches!(t.as_ref(), Expr::Bool(true)) && super::factor::infallible(x) =>
            {
                Some(Expr::Bool(true))
            }
            _ => None,
        },
    },
    Rule {
        name: "float-const",
        apply: |e| match e {
            Expr::Unary(UnOp::ToFloat, x) => match x.as_ref() {
                Expr::Int(n) => Some(Expr::Float(*n as f64)),
                Expr::Bool(v) => Some(Expr::Float(if *v { 1.0 } else { 0.0 })),
                _ => None,
            },
            _ => None,
        },
    },
];

/// Rewrites that make a computation numerically stable.
pub const STABILITY: &[Rule] = &[
    Rule {
        name: "log-exp",
        apply: |e| match e {
            Expr::Unary(UnOp::Log, x) => match x.as_ref() {
                Expr::Unary(UnOp::Exp, y) => Some(y.as_ref().clone()),
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "log-sigmoid",
        apply: |e| match e {
            Expr::Unary(UnOp::Log, x) => match x.as_ref() {
                Expr::Unary(UnOp::Sigmoid, y) => {
                    Some(Expr::unary(UnOp::LogSigmoid, y.as_ref().clone()))
                }
                _ => None,
            },
            _ => None,
        },
    },
    Rule {
        name: "log-one-plus-exp",
        apply: |e| match e {
            Expr::Unary(UnOp::Log, x) => match x.as_ref() {
                Expr::Binary(BinOp::Add, o, ex) | Expr::Binary(BinOp::Add, ex, o)
                    if is_f(o, 1.0) =>
                {
                    match ex.as_ref() {
                        Expr::Unary(UnOp::Exp, y) => {
                            Some(Expr::unary(UnOp::Softplus, y.as_ref().clone()))
                        }
                        _ => None,
                    }
                }
                _ => None,
            },
            _ => None,
        },
    },
];

fn fold_unary(e: &Expr) -> Option<Expr> {
    let Expr::Unary(op, x) = e else { return None };
    let Expr::Float(v) = x.as_ref() else {
        return None;
    };
    let v = *v;
    Some(Expr::Float(match op {
        UnOp::Neg => -v,
        UnOp::Exp => crate::math::exp_f64(v),
        UnOp::Log => v.ln(),
        UnOp::Sqrt => v.sqrt(),
        UnOp::Abs => v.abs(),
        UnOp::Tanh => v.tanh(),
        UnOp::Relu => v.max(0.0),
        UnOp::Detach | UnOp::ToFloat => v,
        _ => return None,
    }))
}

fn fold_binary(e: &Expr) -> Option<Expr> {
    let Expr::Binary(op, a, c) = e else {
        return None;
    };
    match (a.as_ref(), c.as_ref()) {
        (Expr::Float(x), Expr::Float(y)) => {
            let (x, y) = (*x, *y);
            Some(match op {
                BinOp::Add => Expr::Float(x + y),
                BinOp::Sub => Expr::Float(x - y),
                BinOp::Mul => Expr::Float(x * y),
                BinOp::Div => Expr::Float(x / y),
                BinOp::Pow => Expr::Float(x.powf(y)),
                BinOp::Max | BinOp::ClampMin => Expr::Float(x.max(y)),
                BinOp::Min | BinOp::ClampMax => Expr::Float(x.min(y)),
                BinOp::Eq => Expr::Bool(x == y),
                BinOp::Ne => Expr::Bool(x != y),
                BinOp::Lt => Expr::Bool(x < y),
                BinOp::Le => Expr::Bool(x <= y),
                BinOp::Gt => Expr::Bool(x > y),
                BinOp::Ge => Expr::Bool(x >= y),
                _ => return None,
            })
        }
        (Expr::Int(x), Expr::Int(y)) => Some(match op {
            BinOp::Add => Expr::Int(x.wrapping_add(*y)),
            BinOp::Sub => Expr::Int(x.wrapping_sub(*y)),
            BinOp::Mul => Expr::Int(x.wrapping_mul(*y)),
            BinOp::Eq => Expr::Bool(x == y),
            BinOp::Ne => Expr::Bool(x != y),
            BinOp::Lt => Expr::Bool(x < y),
            _ => return None,
        }),
        _ => None,
    }
}

/// Applies `rules` bottom-up until none fires; counts firings by rule name.
pub fn rewrite(
    e: &Expr,
    rules: &[Rule],
    fired: &mut std::collections::BTreeMap<&'static str, usize>,
) -> Expr {
    let mut current = e.clone();
    for _ in 0..32 {
        let mut changed = false;
        let next = current.map(&mut |x| {
            let mut x = x;
            // Bounded, so that no pair of rules can loop forever.
            for _ in 0..64 {
                let Some((name, y)) = rules
                    .iter()
                    .find_map(|r| (r.apply)(&x).map(|y| (r.name, y)))
                else {
                    break;
                };
                *fired.entry(name).or_insert(0) += 1;
                changed = true;
                x = y;
            }
            x
        });
        current = next;
        if !changed {
            break;
        }
    }
    current
}
