//! RFC 8785 JSON Canonicalization Scheme (JCS): the one byte form of a JSON value that the
//! gateway hashes (tool definitions for pins, call arguments for receipts).
//!
//! Input is parsed with [`super::json::parse`] (so duplicate names and lone surrogates are
//! refused, never resolved one way here and another way in a server's checker). Output:
//!
//! - no whitespace;
//! - object members sorted by their names' UTF-16 code units (RFC 8785 §3.2.3);
//! - strings escaped as in [`super::json::write_string`];
//! - numbers as IEEE 754 doubles, written the way ECMAScript's `Number.prototype.toString`
//!   writes them (RFC 8785 §3.2.2.3): `1e3` → `1000`, `1E+23` → `1e+23`, `-0` → `0`.
//!
//! The number writer takes the shortest round-trip digits from `ryu` and lays them out by the
//! ECMAScript rules; the RFC's own test values are run as data in the tests.
//!
//! ## What this module does not do
//!
//! It does not refuse integers beyond 2^53 (JCS reads every number as a double; a caller that
//! signs a hash and needs other implementations to agree checks I-JSON first, as the gateway
//! does for arguments). Numbers that overflow a double are refused: they have no canonical form.

use thiserror::Error;

use super::json::{self, JsonError, Node, Value};

/// Why a value has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum JcsError {
    /// The text is not accepted JSON.
    #[error(transparent)]
    Json(#[from] JsonError),
    /// A number overflows a double (RFC 8785 has no form for infinity).
    #[error("number at byte {offset} has no canonical form")]
    Number {
        /// Where the number starts.
        offset: usize,
    },
}

/// The canonical form of the JSON text `text`.
pub fn canonicalize(text: &str) -> Result<String, JcsError> {
    let node = json::parse(text)?;
    canonicalize_node(&node)
}

/// The canonical form of a parsed value.
pub fn canonicalize_node(node: &Node<'_>) -> Result<String, JcsError> {
    let mut out = String::with_capacity(node.span.end.saturating_sub(node.span.start));
    write(&mut out, node)?;
    Ok(out)
}

fn write(out: &mut String, node: &Node<'_>) -> Result<(), JcsError> {
    match &node.value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(raw) => {
            let v: f64 = raw.parse().map_err(|_| JcsError::Number {
                offset: node.span.start,
            })?;
            if !v.is_finite() {
                return Err(JcsError::Number {
                    offset: node.span.start,
                });
            }
            write_number(out, v);
        }
        Value::String(s) => json::write_string(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(out, item)?;
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut sorted: Vec<(Vec<u16>, &json::Member<'_>)> = members
                .iter()
                .map(|m| (m.key.encode_utf16().collect(), m))
                .collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (_, m)) in sorted.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json::write_string(out, &m.key);
                out.push(':');
                write(out, &m.value)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// Writes a finite double as ECMAScript's `Number.prototype.toString` does.
pub fn write_number(out: &mut String, v: f64) {
    if v == 0.0 {
        out.push('0');
        return;
    }
    let mut buf = ryu::Buffer::new();
    let shortest = buf.format_finite(v);
    let (negative, body) = match shortest.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, shortest),
    };
    // Split ryu's output into its significant digits and the decimal exponent `n` such that
    // value = 0.d1d2…dk × 10^n (ECMAScript's n).
    let (mantissa, exp10) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (body, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = int_part.chars().chain(frac_part.chars()).collect();
    let point = i32::try_from(int_part.len()).unwrap_or(0) + exp10;
    let leading = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..leading);
    let n = point - i32::try_from(leading).unwrap_or(0);
    let trimmed = digits.trim_end_matches('0').len();
    digits.truncate(trimmed);
    let k = i32::try_from(digits.len()).unwrap_or(1);

    if negative {
        out.push('-');
    }
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n(
            '0',
            usize::try_from(n - k).unwrap_or(0),
        ));
    } else if 0 < n && n <= 21 {
        let split = usize::try_from(n).unwrap_or(0);
        out.push_str(digits.get(..split).unwrap_or(""));
        out.push('.');
        out.push_str(digits.get(split..).unwrap_or(""));
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', usize::try_from(-n).unwrap_or(0)));
        out.push_str(&digits);
    } else {
        let e = n - 1;
        out.push_str(digits.get(..1).unwrap_or(""));
        if k > 1 {
            out.push('.');
            out.push_str(digits.get(1..).unwrap_or(""));
        }
        out.push('e');
        out.push(if e >= 0 { '+' } else { '-' });
        out.push_str(&e.unsigned_abs().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8785 Appendix B: IEEE 754 bit patterns and their canonical text.
    const RFC8785_NUMBERS: &[(u64, &str)] = &[
        (0x0000000000000000, "0"),
        (0x8000000000000000, "0"),
        (0x0000000000000001, "5e-324"),
        (0x8000000000000001, "-5e-324"),
        (0x7fefffffffffffff, "1.7976931348623157e+308"),
        (0xffefffffffffffff, "-1.7976931348623157e+308"),
        (0x4340000000000000, "9007199254740992"),
        (0xc340000000000000, "-9007199254740992"),
        (0x4430000000000000, "295147905179352830000"),
        (0x44b52d02c7e14af5, "9.999999999999997e+22"),
        (0x44b52d02c7e14af6, "1e+23"),
        (0x44b52d02c7e14af7, "1.0000000000000001e+23"),
        (0x444b1ae4d6e2ef4e, "999999999999999700000"),
        (0x444b1ae4d6e2ef4f, "999999999999999900000"),
        (0x444b1ae4d6e2ef50, "1e+21"),
        (0x3eb0c6f7a0b5ed8c, "9.999999999999997e-7"),
        (0x3eb0c6f7a0b5ed8d, "0.000001"),
        (0x41b3de4355555553, "333333333.3333332"),
        (0x41b3de4355555554, "333333333.33333325"),
        (0x41b3de4355555555, "333333333.3333333"),
        (0x41b3de4355555556, "333333333.3333334"),
        (0x41b3de4355555557, "333333333.33333343"),
        (0xbecbf647612f3696, "-0.0000033333333333333333"),
        (0x43143ff3c1cb0959, "1424953923781206.2"),
    ];

    #[test]
    fn numbers_match_rfc8785_appendix_b() {
        for &(bits, expected) in RFC8785_NUMBERS {
            let mut out = String::new();
            write_number(&mut out, f64::from_bits(bits));
            assert_eq!(out, expected, "{bits:#018x}");
            // And the canonical text reads back to the same double.
            let back: f64 = expected.parse().unwrap();
            assert_eq!(back, f64::from_bits(bits), "{expected} reads back");
        }
    }

    #[test]
    fn rfc8785_section_3_2_4_example() {
        // The RFC's sorting example (§3.2.3) and its serialisation.
        let input = r#"{
          "\u20ac": "Euro Sign",
          "\r": "Carriage Return",
          "\ufb33": "Hebrew Letter Dalet With Dagesh",
          "1": "One",
          "\ud83d\ude00": "Emoji: Grinning Face",
          "\u0080": "Control",
          "\u00f6": "Latin Small Letter O With Diaeresis"
        }"#;
        let out = canonicalize(input).unwrap();
        let expected = "{\"\\r\":\"Carriage Return\",\"1\":\"One\",\"\u{80}\":\"Control\",\
            \"ö\":\"Latin Small Letter O With Diaeresis\",\"€\":\"Euro Sign\",\
            \"\u{1F600}\":\"Emoji: Grinning Face\",\"\u{fb33}\":\"Hebrew Letter Dalet With Dagesh\"}";
        assert_eq!(out, expected);
    }

    #[test]
    fn rfc8785_section_3_2_2_example() {
        let input = r#"{
          "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
          "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
          "literals": [null, true, false]
        }"#;
        let expected = r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#;
        assert_eq!(canonicalize(input).unwrap(), expected);
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = canonicalize(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b = canonicalize("{ \"a\" : { \"x\":\"s\" ,\"y\":[1.0, 2e0]},\n\"b\":10e-1}").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn refuses_what_has_no_canonical_form() {
        assert_eq!(
            canonicalize("[1e999]").unwrap_err(),
            JcsError::Number { offset: 1 }
        );
        assert!(matches!(
            canonicalize(r#"{"a":1,"a":2}"#),
            Err(JcsError::Json(JsonError::DuplicateKey { .. }))
        ));
    }
}
