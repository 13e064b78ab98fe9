//! The derivative table: one row per scalar operation. Nothing else in `grad`
//! knows about individual operations.
//!
//! Each row takes the operation's operands, its own forward expression `y`
//! and the adjoint `g` flowing into it, and returns the adjoint of each
//! operand (`None` where no gradient flows). Conventions follow PyTorch, the
//! reference: relu'(0) = 0, |x|'(0) = 0, sqrt'(0) = 0 (the subgradient torch
//! uses for norms at zero distance), `maximum`/`minimum` split a tie in half,
//! `clamp_min`/`clamp_max` pass the gradient to `x` on a tie.

use crate::ir::{BinOp, Expr, UnOp};

fn f(x: f64) -> Expr {
    Expr::Float(x)
}
fn mul(a: Expr, b: Expr) -> Expr {
    Expr::binary(BinOp::Mul, a, b)
}
fn div(a: Expr, b: Expr) -> Expr {
    Expr::binary(BinOp::Div, a, b)
}
fn sub(a: Expr, b: Expr) -> Expr {
    Expr::binary(BinOp::Sub, a, b)
}
fn neg(a: Expr) -> Expr {
    Expr::unary(UnOp::Neg, a)
}
fn when(c: Expr, a: Expr) -> Expr {
    Expr::Select(Box::new(c), Box::new(a), Box::new(f(0.0)))
}
fn cmp(op: BinOp, a: &Expr, b: &Expr) -> Expr {
    Expr::binary(op, a.clone(), b.clone())
}

/// d/dx of a unary operation, times `g`. `y` is the forward value op(x).
pub fn unary(op: UnOp, x: &Expr, y: &Expr, g: Expr) -> Option<Expr> {
    Some(match op {
        // d/dx (-x) = -1
        UnOp::Neg => neg(g),
        // d/dx e^x = e^x
        UnOp::Exp => mul(g, y.clone()),
        // d/dx log x = 1/x
        UnOp::Log => div(g, x.clone()),
        // d/dx sqrt x = 1 / (2 sqrt x), and 0 at x = 0 (torch's norm at zero distance)
        UnOp::Sqrt => when(cmp(BinOp::Gt, y, &f(0.0)), div(mul(g, f(0.5)), y.clone())),
        // d/dx |x| = sign(x), 0 at 0
        UnOp::Abs => mul(g, sign(x)),
        // d/dx relu x = [x > 0]
        UnOp::Relu => when(cmp(BinOp::Gt, x, &f(0.0)), g),
        // d/dx log(1 + e^x) = sigmoid(x)
        UnOp::Softplus => mul(g, Expr::unary(UnOp::Sigmoid, x.clone())),
        // d/dx sigmoid x = sigmoid(x) (1 - sigmoid(x))
        UnOp::Sigmoid => mul(g, mul(y.clone(), sub(f(1.0), y.clone()))),
        // d/dx log sigmoid x = sigmoid(-x)
        UnOp::LogSigmoid => mul(g, Expr::unary(UnOp::Sigmoid, neg(x.clone()))),
        // d/dx tanh x = 1 - tanh(x)^2
        UnOp::Tanh => mul(g, sub(f(1.0), mul(y.clone(), y.clone()))),
        // stop-gradient; float(int) and not(bool) carry no gradient
        UnOp::Detach | UnOp::ToFloat | UnOp::Not => return None,
    })
}

fn sign(x: &Expr) -> Expr {
    let pos = cmp(BinOp::Gt, x, &f(0.0));
    let negative = cmp(BinOp::Lt, x, &f(0.0));
    Expr::Select(
        Box::new(pos),
        Box::new(f(1.0)),
        Box::new(when(negative, f(-1.0))),
    )
}

/// d/da and d/db of a binary operation, times `g`. `y` is the forward value.
pub fn binary(op: BinOp, a: &Expr, b: &Expr, y: &Expr, g: Expr) -> (Option<Expr>, Option<Expr>) {
    match op {
        // d(a + b) = da + db
        BinOp::Add => (Some(g.clone()), Some(g)),
        // d(a - b) = da - db
        BinOp::Sub => (Some(g.clone()), Some(neg(g))),
        // d(ab) = b da + a db
        BinOp::Mul => (Some(mul(g.clone(), b.clone())), Some(mul(g, a.clone()))),
        // d(a/b) = da / b - (a/b) db / b
        BinOp::Div => (
            Some(div(g.clone(), b.clone())),
            Some(neg(div(mul(g, y.clone()), b.clone()))),
        ),
        // d(a^b) = b a^(b-1) da + a^b log(a) db
        // d(a^b) = b a^(b-1) da + a^b log(a) db; as torch: no da where b = 0,
        // no db where a = 0 and b >= 0 (0 * inf would be NaN)
        BinOp::Pow => {
            let da = match b {
                Expr::Float(2.0) => mul(g.clone(), mul(f(2.0), a.clone())),
                Expr::Float(k) if *k != 0.0 => mul(
                    g.clone(),
                    mul(b.clone(), Expr::binary(BinOp::Pow, a.clone(), f(k - 1.0))),
                ),
                _ => {
                    let ne0 = cmp(BinOp::Ne, b, &f(0.0));
                    when(
                        ne0,
                        mul(
                            g.clone(),
                            mul(
                                b.clone(),
                                Expr::binary(BinOp::Pow, a.clone(), sub(b.clone(), f(1.0))),
                            ),
                        ),
                    )
                }
            };
            let zero_base = Expr::binary(
                BinOp::And,
                cmp(BinOp::Eq, a, &f(0.0)),
                cmp(BinOp::Ge, b, &f(0.0)),
            );
            let db = Expr::Select(
                Box::new(zero_base),
                Box::new(f(0.0)),
                Box::new(mul(g, mul(y.clone(), Expr::unary(UnOp::Log, a.clone())))),
            );
            (Some(da), Some(db))
        }
        // torch.maximum / minimum: the larger (smaller) side; a tie splits in half
        BinOp::Max | BinOp::Min => {
            let (wins, loses) = if op == BinOp::Max {
                (BinOp::Gt, BinOp::Lt)
            } else {
                (BinOp::Lt, BinOp::Gt)
            };
            let half = mul(g.clone(), f(0.5));
            let to_a = Expr::Select(
                Box::new(cmp(wins, a, b)),
                Box::new(g.clone()),
                Box::new(when(cmp(BinOp::Eq, a, b), half.clone())),
            );
            let to_b = Expr::Select(
                Box::new(cmp(loses, a, b)),
                Box::new(g),
                Box::new(when(cmp(BinOp::Eq, a, b), half)),
            );
            (Some(to_a), Some(to_b))
        }
        // clamp_min(x, lo): x where x >= lo, else lo
        BinOp::ClampMin => (
            Some(when(cmp(BinOp::Ge, a, b), g.clone())),
            Some(when(cmp(BinOp::Lt, a, b), g)),
        ),
        // clamp_max(x, hi): x where x <= hi, else hi
        BinOp::ClampMax => (
            Some(when(cmp(BinOp::Le, a, b), g.clone())),
            Some(when(cmp(BinOp::Gt, a, b), g)),
        ),
        // comparisons, logic and integer remainder are piecewise constant
        BinOp::Rem
        | BinOp::FloorDiv
        | BinOp::Eq
        | BinOp::Ne
        | BinOp::Lt
        | BinOp::Le
        | BinOp::Gt
        | BinOp::Ge
        | BinOp::And
        | BinOp::Or => (None, None),
    }
}
