//! Half-precision bit conversions (IEEE binary16 and bfloat16) to f32.
//!
//! This module owns only the bit arithmetic, so that reading F16/BF16
//! safetensors needs no extra dependency; it must not know about files,
//! tensors or errors. Both conversions are exact: every f16 and bf16 value,
//! subnormals, infinities and NaNs included, is representable in f32.

/// 2^-24, the value of the f16 subnormal with mantissa 1; built from its bit
/// pattern so that it is exact (biased exponent 127 - 24, zero mantissa).
const F16_SUBNORMAL_UNIT: f32 = f32::from_bits((127 - 24) << 23);

/// Converts IEEE 754 binary16 bits to the f32 of the same value.
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let negative = bits & 0x8000 != 0;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x03ff);
    let sign = if negative { 1u32 << 31 } else { 0 };
    match exponent {
        // Zero or subnormal: the value is mantissa * 2^-24, which is a
        // normal f32 (or zero), so one exact multiplication gives it.
        0 => {
            let magnitude = mantissa as f32 * F16_SUBNORMAL_UNIT;
            if negative {
                -magnitude
            } else {
                magnitude
            }
        }
        // Infinity or NaN: keep the payload so a NaN stays a NaN.
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        // Normal: rebias the exponent from 15 to 127.
        _ => f32::from_bits(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13)),
    }
}

/// Converts bfloat16 bits to f32: bfloat16 is the top half of an f32.
pub(crate) fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}
