//! Symbolic dimensions: polynomials over named sizes with integer coefficients.
//!
//! `B`, `2*D`, `B + B*K` are all `Dim`s. A `Dim` is kept in a canonical form
//! (a sorted map from monomials to coefficients, zero terms dropped), so two
//! dims are equal exactly when their polynomials are. Nothing here knows the
//! runtime sizes; `eval` takes them as an argument.

use std::collections::BTreeMap;
use std::fmt;

/// A product of symbol names, sorted; the empty product is the constant 1.
type Monomial = Vec<String>;

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Dim {
    terms: BTreeMap<Monomial, i64>,
}

impl Dim {
    pub fn lit(n: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if n != 0 {
            terms.insert(Vec::new(), n);
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        Dim {
            terms: BTreeMap::from([(vec![name.to_string()], 1)]),
        }
    }

    /// `Some(n)` when the dim is a known constant.
    pub fn as_lit(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    /// `Some(name)` when the dim is exactly one symbol.
    pub fn as_sym(&self) -> Option<&str> {
        match self.terms.iter().next() {
            Some((m, 1)) if self.terms.len() == 1 && m.len() == 1 => Some(&m[0]),
            _ => None,
        }
    }

    pub fn symbols(&self) -> Vec<String> {
        let mut out: Vec<String> = self.terms.keys().flatten().cloned().collect();
        out.sort();
        out.dedup();
        out
    }

    pub fn add(&self, other: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &other.terms {
            *terms.entry(m.clone()).or_insert(0) += c;
        }
        terms.retain(|_, c| *c != 0);
        Dim { terms }
    }

    pub fn neg(&self) -> Dim {
        Dim {
            terms: self.terms.iter().map(|(m, c)| (m.clone(), -c)).collect(),
        }
    }

    pub fn sub(&self, other: &Dim) -> Dim {
        self.add(&other.neg())
    }

    pub fn mul(&self, other: &Dim) -> Dim {
        let mut terms: BTreeMap<Monomial, i64> = BTreeMap::new();
        for (m1, c1) in &self.terms {
            for (m2, c2) in &other.terms {
                let mut m: Monomial = m1.iter().chain(m2).cloned().collect();
                m.sort();
                *terms.entry(m).or_insert(0) += c1 * c2;
            }
        }
        terms.retain(|_, c| *c != 0);
        Dim { terms }
    }

    /// True when the polynomial is >= 0 for every non-negative assignment of
    /// its symbols (all coefficients non-negative).
    pub fn is_non_negative(&self) -> bool {
        self.terms.values().all(|c| *c >= 0)
    }

    /// The value under `sizes`; `None` if a symbol is unbound.
    pub fn eval(&self, sizes: &BTreeMap<String, i64>) -> Option<i64> {
        let mut total = 0i64;
        for (m, c) in &self.terms {
            let mut p = *c;
            for s in m {
                p = p.checked_mul(*sizes.get(s)?)?;
            }
            total = total.checked_add(p)?;
        }
        Some(total)
    }

    /// Solves `self == value` for its one unbound symbol when the dim is linear
    /// in it (`c*X + known`). Returns the symbol and its value.
    pub fn solve(&self, value: i64, sizes: &BTreeMap<String, i64>) -> Option<(String, i64)> {
        let unknown: Vec<String> = self
            .symbols()
            .into_iter()
            .filter(|s| !sizes.contains_key(s))
            .collect();
        let [x] = unknown.as_slice() else { return None };
        let mut coef = 0i64;
        let mut rest = Dim::default();
        for (m, c) in &self.terms {
            match m.iter().filter(|s| *s == x).count() {
                0 => {
                    rest.terms.insert(m.clone(), *c);
                }
                1 => {
                    let others: Monomial = m.iter().filter(|s| *s != x).cloned().collect();
                    let factor = Dim {
                        terms: BTreeMap::from([(others, *c)]),
                    }
                    .eval(sizes)?;
                    coef += factor;
                }
                _ => return None,
            }
        }
        let known = rest.eval(sizes)?;
        if coef == 0 || (value - known) % coef != 0 {
            return None;
        }
        Some((x.clone(), (value - known) / coef))
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        // Symbols first (B before 2*B*K), the constant last: `B*K + B + 1`.
        let mut terms: Vec<(&Monomial, &i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (n, (m, c)) in terms.into_iter().enumerate() {
            let (sign, mag) = if *c < 0 { ("-", -c) } else { ("+", *c) };
            if n == 0 {
                if sign == "-" {
                    write!(f, "-")?;
                }
            } else {
                write!(f, " {sign} ")?;
            }
            let body = m.join("*");
            match (mag, body.is_empty()) {
                (_, true) => write!(f, "{mag}")?,
                (1, false) => write!(f, "{body}")?,
                (_, false) => write!(f, "{mag}*{body}")?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// `[B, D]`.
pub fn shape_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_form_makes_equal_polynomials_equal() {
        let b = Dim::sym("B");
        let k = Dim::sym("K");
        let n1 = b.add(&k.mul(&b));
        let n2 = b.mul(&Dim::lit(1).add(&k));
        assert_eq!(n1, n2);
        assert_eq!(n1.to_string(), "B*K + B");
        assert_eq!(b.sub(&b), Dim::lit(0));
        assert_eq!(Dim::lit(2).mul(&Dim::sym("D")).to_string(), "2*D");
    }

    #[test]
    fn eval_and_solve() {
        let sizes = BTreeMap::from([("B".to_string(), 8i64)]);
        let n = Dim::sym("B").mul(&Dim::lit(1).add(&Dim::sym("K")));
        assert_eq!(n.solve(24, &sizes), Some(("K".to_string(), 2)));
        assert_eq!(
            Dim::lit(3).mul(&Dim::sym("D")).solve(48, &BTreeMap::new()),
            Some(("D".into(), 16))
        );
        assert_eq!(
            Dim::lit(3).mul(&Dim::sym("D")).solve(47, &BTreeMap::new()),
            None
        );
        assert_eq!(Dim::sym("B").add(&Dim::lit(2)).eval(&sizes), Some(10));
    }
}
