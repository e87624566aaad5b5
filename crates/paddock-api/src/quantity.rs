//! Kubernetes resource quantities (`20Gi`, `1.5G`, `512M`, `1e9`) as whole numbers of bytes.
//!
//! k8s-openapi carries a quantity as an opaque string; paddock needs its value to check that a disk is
//! at least as large as its image and that memory is sane, with the API server's own reading of the
//! suffixes. Fractions of a byte round up, as the API server does when it canonicalises.

use thiserror::Error;

/// Why a string is not a quantity.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantityError {
    /// The string is empty or has no digits.
    #[error("'{0}' is not a quantity: expected a number with an optional suffix, e.g. 20Gi or 512M")]
    Malformed(String),
    /// The suffix is not one Kubernetes knows.
    #[error(
        "'{quantity}' has an unknown suffix '{suffix}': use Ki, Mi, Gi, Ti, Pi, Ei (powers of 1024) or k, M, G, T, P, E (powers of 1000)"
    )]
    UnknownSuffix {
        /// The whole quantity.
        quantity: String,
        /// The suffix that was not understood.
        suffix: String,
    },
    /// The value is negative.
    #[error("'{0}' is negative; sizes must be positive")]
    Negative(String),
    /// The value does not fit.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// The value of a quantity in whole units (bytes for sizes), rounded up.
pub fn parse_quantity(text: &str) -> Result<u128, QuantityError> {
    let trimmed = text.trim();
    let malformed = || QuantityError::Malformed(text.to_owned());
    let too_large = || QuantityError::TooLarge(text.to_owned());
    let unsigned = match trimmed.strip_prefix('-') {
        Some(rest) if rest.chars().any(|c| c.is_ascii_digit() && c != '0') => {
            return Err(QuantityError::Negative(text.to_owned()));
        }
        Some(rest) => rest,
        None => trimmed.strip_prefix('+').unwrap_or(trimmed),
    };
    let number_end = unsigned
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(unsigned.len());
    let (number, suffix) = unsigned.split_at(number_end);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return Err(malformed());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let mut mantissa: u128 = 0;
    for digit in whole.chars().chain(fraction.chars()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(digit.to_digit(10).unwrap_or(0))))
            .ok_or_else(too_large)?;
    }
    // value = mantissa * multiplier / 10^(decimal places - decimal exponent)
    let mut decimal_exponent: i64 = -(fraction.len() as i64);
    let mut multiplier: u128 = 1;
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = match suffix {
                "Ki" => 1,
                "Mi" => 2,
                "Gi" => 3,
                "Ti" => 4,
                "Pi" => 5,
                _ => 6,
            };
            multiplier = 1024u128.pow(power);
        }
        "n" => decimal_exponent -= 9,
        "u" => decimal_exponent -= 6,
        "m" => decimal_exponent -= 3,
        "k" => decimal_exponent += 3,
        "M" => decimal_exponent += 6,
        "G" => decimal_exponent += 9,
        "T" => decimal_exponent += 12,
        "P" => decimal_exponent += 15,
        "E" => decimal_exponent += 18,
        _ => {
            let exponent = suffix
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i64>().ok())
                .ok_or_else(|| QuantityError::UnknownSuffix {
                    quantity: text.to_owned(),
                    suffix: suffix.to_owned(),
                })?;
            decimal_exponent += exponent;
        }
    }
    let mut value = mantissa.checked_mul(multiplier).ok_or_else(too_large)?;
    if decimal_exponent >= 0 {
        let scale = 10u128.checked_pow(u32::try_from(decimal_exponent).map_err(|_| too_large())?);
        value = scale.and_then(|s| value.checked_mul(s)).ok_or_else(too_large)?;
    } else {
        let divisor = 10u128.checked_pow(u32::try_from(-decimal_exponent).map_err(|_| too_large())?);
        value = match divisor {
            Some(divisor) => value.div_ceil(divisor),
            // Smaller than any representable unit but not zero: one unit, as rounding up demands.
            None => u128::from(value > 0),
        };
    }
    Ok(value)
}

/// Formats a byte count as the largest binary suffix that represents it exactly (`10Gi`, `1536Mi`).
pub fn format_binary(bytes: u128) -> String {
    const SUFFIXES: [&str; 6] = ["Ei", "Pi", "Ti", "Gi", "Mi", "Ki"];
    for (index, suffix) in SUFFIXES.iter().enumerate() {
        let unit = 1024u128.pow(6 - index as u32);
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity("20Gi"), Ok(20 * 1024 * 1024 * 1024));
        assert_eq!(parse_quantity("512Mi"), Ok(512 * 1024 * 1024));
        assert_eq!(parse_quantity("1.5Gi"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_quantity("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("128k"), Ok(128_000));
        assert_eq!(parse_quantity("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("2E"), Ok(2_000_000_000_000_000_000));
        assert_eq!(parse_quantity("1024"), Ok(1024));
        assert_eq!(parse_quantity("1500m"), Ok(2), "fractions round up");
        assert_eq!(parse_quantity("0"), Ok(0));
    }

    #[test]
    fn rejects_what_the_api_server_rejects() {
        assert!(matches!(parse_quantity(""), Err(QuantityError::Malformed(_))));
        assert!(matches!(parse_quantity("Gi"), Err(QuantityError::Malformed(_))));
        assert!(matches!(
            parse_quantity("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("10GB"),
            Err(QuantityError::UnknownSuffix { .. })
        ));
        assert!(matches!(parse_quantity("-1Gi"), Err(QuantityError::Negative(_))));
        let message = parse_quantity("10GB")
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            message.contains("Gi"),
            "the error names the suffixes to use: {message}"
        );
    }

    #[test]
    fn formats_exact_binary_sizes() {
        assert_eq!(format_binary(10 * 1024 * 1024 * 1024), "10Gi");
        assert_eq!(format_binary(1536 * 1024 * 1024), "1536Mi");
        assert_eq!(format_binary(1000), "1000");
    }
}
