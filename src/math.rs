//! lossc's exponential, the one `exp` every CPU backend computes.
//!
//! The interpreter, the JIT's scalar helper and the JIT's SIMD lanes
//! (`jit/translate/simd.rs`, which emits these same steps with these same
//! constants) all evaluate this algorithm, operation for operation, so they
//! give the same bits; the platform's libm `exp` would differ from an inline
//! vector version by an ulp here and there. It is accurate to about one ulp:
//!
//! 1. NaN is returned as is; `x` is clamped to a range whose ends already
//!    overflow to infinity and underflow to zero.
//! 2. `n = round(x / ln 2)` by the magic-number trick (`x * log2(e) + 1.5 *
//!    2^p` rounds to an integer in the float's last place), `r = x - n ln 2`
//!    in two parts (Cody–Waite), so `|r| <= ~0.35`.
//! 3. `e^r` by its Taylor polynomial in Horner form (degree 13 for f64, 7
//!    for f32: truncation far below half an ulp on that interval).
//! 4. `e^x = e^r * 2^h * 2^(n-h)` with `h = floor(n / 2)`: two exact scalings,
//!    so results near the ends (overflow, subnormals) round once, correctly.
//!
//! No fused multiply-add anywhere: Rust and Cranelift both keep `a * b + c`
//! as two roundings, so every implementation agrees.

/// The constants of one precision's algorithm.
pub struct ExpConsts<F: 'static> {
    pub log2e: F,
    pub ln2_hi: F,
    pub ln2_lo: F,
    /// `1.5 * 2^(mantissa bits)`: adding it rounds to an integer.
    pub magic: F,
    /// `x` is clamped to `lo ..= hi`.
    pub lo: F,
    pub hi: F,
    /// Taylor coefficients `1/k!`, highest degree first (Horner order).
    pub coef: &'static [F],
    /// `-n` at `lo` (even), so `(n + bias) >> 1` is a logical shift.
    pub shift_bias: i64,
    pub exp_bias: i64,
    pub mantissa_bits: i64,
}

pub const EXP_F64: ExpConsts<f64> = ExpConsts {
    log2e: std::f64::consts::LOG2_E,
    // fdlibm's split of ln 2: the high part has 32 trailing zero bits, so
    // `n * ln2_hi` is exact for every n this range produces.
    ln2_hi: f64::from_bits(0x3fe6_2e42_fee0_0000),
    ln2_lo: f64::from_bits(0x3dea_39ef_3579_3c76),
    magic: 6_755_399_441_055_744.0,
    lo: -746.0,
    hi: 710.0,
    coef: &[
        1.0 / 6_227_020_800.0,
        1.0 / 479_001_600.0,
        1.0 / 39_916_800.0,
        1.0 / 3_628_800.0,
        1.0 / 362_880.0,
        1.0 / 40_320.0,
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ],
    shift_bias: 1076,
    exp_bias: 1023,
    mantissa_bits: 52,
};

pub const EXP_F32: ExpConsts<f32> = ExpConsts {
    log2e: std::f32::consts::LOG2_E,
    // 0.693359375 has 10 significant bits: `n * ln2_hi` is exact.
    ln2_hi: 0.693_359_4,
    ln2_lo: -2.121_944_4e-4,
    magic: 12_582_912.0,
    lo: -104.0,
    hi: 89.0,
    coef: &[
        1.0 / 5_040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ],
    shift_bias: 150,
    exp_bias: 127,
    mantissa_bits: 23,
};

macro_rules! exp_impl {
    ($name:ident, $f:ty, $bits:ty, $c:expr) => {
        /// lossc's `exp` (module doc).
        pub fn $name(x: $f) -> $f {
            let c = &$c;
            if x.is_nan() {
                return x;
            }
            // Compare-and-pick (not `max`/`min`): cheap in vector code too.
            let x = if x < c.lo { c.lo } else { x };
            let x = if x > c.hi { c.hi } else { x };
            let t = x * c.log2e + c.magic;
            let n = t - c.magic;
            let r = x - n * c.ln2_hi;
            let r = r - n * c.ln2_lo;
            let mut p = c.coef[0];
            for k in &c.coef[1..] {
                p = p * r + *k;
            }
            let ni = t.to_bits().wrapping_sub(c.magic.to_bits());
            let bias = c.shift_bias as $bits;
            let h = (ni.wrapping_add(bias) >> 1).wrapping_sub(bias >> 1);
            let e = c.exp_bias as $bits;
            let s1 = <$f>::from_bits(h.wrapping_add(e) << c.mantissa_bits);
            let s2 = <$f>::from_bits(ni.wrapping_sub(h).wrapping_add(e) << c.mantissa_bits);
            p * s1 * s2
        }
    };
}

exp_impl!(exp_f64, f64, u64, EXP_F64);
exp_impl!(exp_f32, f32, u32, EXP_F32);

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error in ulps of the correctly rounded neighbourhood.
    fn ulps64(got: f64, want: f64) -> f64 {
        if got == want {
            return 0.0;
        }
        (got - want).abs() / (want.abs() * f64::EPSILON)
    }

    #[test]
    fn f64_is_within_two_ulps_of_libm_across_the_range() {
        let mut worst = 0.0f64;
        let mut x = -700.0f64;
        while x < 700.0 {
            worst = worst.max(ulps64(exp_f64(x), x.exp()));
            x += 0.0137;
        }
        for x in [
            -1e-300, 0.0, 1e-300, 1e-9, -1e-9, 0.5, -0.5, 1.0, 88.7, -87.3,
        ] {
            worst = worst.max(ulps64(exp_f64(x), x.exp()));
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
    }

    #[test]
    fn f32_is_within_two_ulps_of_the_f64_value() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            worst = worst.max((got - want).abs() / (want * f64::from(f32::EPSILON)));
            x += 0.00731;
        }
        assert!(worst <= 2.0, "worst error {worst} ulps");
    }

    #[test]
    fn ends_of_the_range_and_special_values() {
        assert_eq!(exp_f64(0.0), 1.0);
        assert_eq!(exp_f64(-0.0), 1.0);
        assert_eq!(exp_f64(710.0), f64::INFINITY);
        assert_eq!(exp_f64(1e300), f64::INFINITY);
        assert_eq!(exp_f64(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp_f64(-746.0), 0.0);
        assert_eq!(exp_f64(f64::NEG_INFINITY), 0.0);
        assert!(exp_f64(f64::NAN).is_nan());
        assert_eq!(exp_f64(709.78), 709.78f64.exp());
        // Subnormal results: within one ulp of the smallest subnormal.
        let s = exp_f64(-740.0);
        assert!(s > 0.0 && (s - (-740.0f64).exp()).abs() <= 5e-324, "{s:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        let s = exp_f32(-100.0);
        assert!(
            s > 0.0 && (f64::from(s) - (-100.0f64).exp()).abs() <= 1.5e-45,
            "{s:e}"
        );
    }
}
