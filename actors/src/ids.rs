//! Random identifiers made on the request path: request ids and server-made vote ids.

/// 32 lowercase hex digits of a random 128-bit number.
///
/// Why not `format!("{:032x}")`: the generic formatting machinery costs many times more per
/// id, and every vote makes one or two (docs/BENCHMARKS.md, "Fast paths").
pub fn random_hex() -> [u8; 32] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let n: u128 = rand::random();
    let mut hex = [0u8; 32];
    for (i, digit) in hex.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (124 - 4 * i)) & 0xf) as usize];
    }
    hex
}

/// [`random_hex`] after `prefix`, as a `String`.
pub fn random_id(prefix: &str) -> String {
    let hex = random_hex();
    let mut id = String::with_capacity(prefix.len() + hex.len());
    id.push_str(prefix);
    id.push_str(std::str::from_utf8(&hex).expect("hex digits are ASCII"));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_32_hex_digits_and_differ() {
        let a = random_id("s-");
        let b = random_id("s-");
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("s-"));
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn every_digit_position_is_used() {
        // With the shift off by one nibble, some positions would always be '0'.
        let seen: Vec<bool> = (0..32)
            .map(|i| (0..64).any(|_| random_hex()[i] != b'0'))
            .collect();
        assert!(seen.iter().all(|s| *s), "{seen:?}");
    }
}
