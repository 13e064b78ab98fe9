//! The math functions generated code calls: Rust `extern "C"` functions,
//! registered with the JIT as symbols (`lossc_jit_<name>_<f32|f64>`) and
//! imported into every kernel. Each one is the interpreter's formula, word for
//! word, so both backends round the same way (`exp` is lossc's own,
//! `crate::math`; `ln`, `tanh`, `powf` are the same libm calls; softplus, log_sigmoid and sigmoid the same stable
//! forms; float-to-int the same saturating-to-zero conversion).

use super::Precision;
use cranelift_codegen::ir::{types, AbiParam, FuncRef, Function};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{FuncId, Linkage, Module};
use num_traits::{Float, ToPrimitive};

fn nan_max<F: Float>(a: F, b: F) -> F {
    if a.is_nan() || b.is_nan() {
        F::nan()
    } else if a >= b {
        a
    } else {
        b
    }
}

fn nan_min<F: Float>(a: F, b: F) -> F {
    if a.is_nan() || b.is_nan() {
        F::nan()
    } else if a <= b {
        a
    } else {
        b
    }
}

fn softplus<F: Float>(x: F) -> F {
    nan_max(x, F::zero()) + (-x.abs()).exp().ln_1p()
}

fn log_sigmoid<F: Float>(x: F) -> F {
    nan_min(x, F::zero()) - (-x.abs()).exp().ln_1p()
}

fn sigmoid<F: Float>(x: F) -> F {
    if x >= F::zero() {
        F::one() / (F::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (F::one() + e)
    }
}

macro_rules! helpers {
    ($f:ty, $exp:ident, $ln:ident, $tanh:ident, $pow:ident, $sp:ident, $ls:ident, $sg:ident, $ti:ident) => {
        extern "C" fn $exp(x: $f) -> $f {
            crate::math::$exp(x)
        }
        extern "C" fn $ln(x: $f) -> $f {
            x.ln()
        }
        extern "C" fn $tanh(x: $f) -> $f {
            x.tanh()
        }
        extern "C" fn $pow(x: $f, y: $f) -> $f {
            x.powf(y)
        }
        extern "C" fn $sp(x: $f) -> $f {
            softplus(x)
        }
        extern "C" fn $ls(x: $f) -> $f {
            log_sigmoid(x)
        }
        extern "C" fn $sg(x: $f) -> $f {
            sigmoid(x)
        }
        extern "C" fn $ti(x: $f) -> i64 {
            x.to_i64().unwrap_or(0)
        }
    };
}

helpers!(
    f64,
    exp_f64,
    ln_f64,
    tanh_f64,
    pow_f64,
    softplus_f64,
    log_sigmoid_f64,
    sigmoid_f64,
    to_int_f64
);
helpers!(
    f32,
    exp_f32,
    ln_f32,
    tanh_f32,
    pow_f32,
    softplus_f32,
    log_sigmoid_f32,
    sigmoid_f32,
    to_int_f32
);

/// Which helper; the order of `NAMES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Math {
    Exp,
    Ln,
    Tanh,
    Pow,
    Softplus,
    LogSigmoid,
    Sigmoid,
    ToInt,
}

const ALL: [Math; 8] = [
    Math::Exp,
    Math::Ln,
    Math::Tanh,
    Math::Pow,
    Math::Softplus,
    Math::LogSigmoid,
    Math::Sigmoid,
    Math::ToInt,
];

impl Math {
    fn name(self) -> &'static str {
        match self {
            Math::Exp => "exp",
            Math::Ln => "ln",
            Math::Tanh => "tanh",
            Math::Pow => "pow",
            Math::Softplus => "softplus",
            Math::LogSigmoid => "log_sigmoid",
            Math::Sigmoid => "sigmoid",
            Math::ToInt => "to_int",
        }
    }

    fn symbol(self, p: Precision) -> String {
        let suffix = match p {
            Precision::F32 => "f32",
            Precision::F64 => "f64",
        };
        format!("lossc_jit_{}_{suffix}", self.name())
    }

    fn address(self, p: Precision) -> *const u8 {
        match (p, self) {
            (Precision::F64, Math::Exp) => exp_f64 as extern "C" fn(f64) -> f64 as *const u8,
            (Precision::F64, Math::Ln) => ln_f64 as extern "C" fn(f64) -> f64 as *const u8,
            (Precision::F64, Math::Tanh) => tanh_f64 as extern "C" fn(f64) -> f64 as *const u8,
            (Precision::F64, Math::Pow) => pow_f64 as extern "C" fn(f64, f64) -> f64 as *const u8,
            (Precision::F64, Math::Softplus) => {
                softplus_f64 as extern "C" fn(f64) -> f64 as *const u8
            }
            (Precision::F64, Math::LogSigmoid) => {
                log_sigmoid_f64 as extern "C" fn(f64) -> f64 as *const u8
            }
            (Precision::F64, Math::Sigmoid) => {
                sigmoid_f64 as extern "C" fn(f64) -> f64 as *const u8
            }
            (Precision::F64, Math::ToInt) => to_int_f64 as extern "C" fn(f64) -> i64 as *const u8,
            (Precision::F32, Math::Exp) => exp_f32 as extern "C" fn(f32) -> f32 as *const u8,
            (Precision::F32, Math::Ln) => ln_f32 as extern "C" fn(f32) -> f32 as *const u8,
            (Precision::F32, Math::Tanh) => tanh_f32 as extern "C" fn(f32) -> f32 as *const u8,
            (Precision::F32, Math::Pow) => pow_f32 as extern "C" fn(f32, f32) -> f32 as *const u8,
            (Precision::F32, Math::Softplus) => {
                softplus_f32 as extern "C" fn(f32) -> f32 as *const u8
            }
            (Precision::F32, Math::LogSigmoid) => {
                log_sigmoid_f32 as extern "C" fn(f32) -> f32 as *const u8
            }
            (Precision::F32, Math::Sigmoid) => {
                sigmoid_f32 as extern "C" fn(f32) -> f32 as *const u8
            }
            (Precision::F32, Math::ToInt) => to_int_f32 as extern "C" fn(f32) -> i64 as *const u8,
        }
    }
}

/// Makes every helper of precision `p` resolvable by name in the module.
pub(super) fn register(builder: &mut JITBuilder, p: Precision) {
    for m in ALL {
        builder.symbol(m.symbol(p), m.address(p));
    }
}

/// The helpers declared (imported) in a module.
pub(super) struct Declared(Vec<FuncId>);

pub(super) fn declare(module: &mut JITModule, p: Precision) -> Result<Declared, String> {
    let fty = p.float_type();
    let mut ids = Vec::new();
    for m in ALL {
        let mut sig = module.make_signature();
        sig.params.push(AbiParam::new(fty));
        if m == Math::Pow {
            sig.params.push(AbiParam::new(fty));
        }
        sig.returns.push(AbiParam::new(if m == Math::ToInt {
            types::I64
        } else {
            fty
        }));
        ids.push(
            module
                .declare_function(&m.symbol(p), Linkage::Import, &sig)
                .map_err(|e| format!("declaring helper {}: {e}", m.name()))?,
        );
    }
    Ok(Declared(ids))
}

/// The helpers as callable references inside one function.
pub(super) struct Imported(Vec<FuncRef>);

impl Imported {
    pub fn get(&self, m: Math) -> FuncRef {
        self.0[ALL.iter().position(|x| *x == m).unwrap_or(0)]
    }
}

pub(super) fn import(module: &mut JITModule, declared: &Declared, func: &mut Function) -> Imported {
    Imported(
        declared
            .0
            .iter()
            .map(|id| module.declare_func_in_func(*id, func))
            .collect(),
    )
}
