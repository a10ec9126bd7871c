//! KSUIDs, the ids ConductorOne gives sync runs: 4 bytes of seconds since
//! 2014-05-13 16:53:20 UTC and 16 random bytes, as 27 base-62 characters.

use rand::RngCore;

/// KSUID epoch: Unix time 1,400,000,000.
const EPOCH: i64 = 1_400_000_000;
const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Encoded length: 20 bytes in base 62, zero-padded.
pub const LEN: usize = 27;

/// A new KSUID for `unix_seconds` (clamped to the KSUID range).
pub fn new_at(unix_seconds: i64) -> String {
    let mut bytes = [0u8; 20];
    let since = (unix_seconds - EPOCH).clamp(0, i64::from(u32::MAX)) as u32;
    bytes[..4].copy_from_slice(&since.to_be_bytes());
    rand::rng().fill_bytes(&mut bytes[4..]);
    encode(&bytes)
}

/// A new KSUID for now.
pub fn new() -> String {
    new_at(jiff::Timestamp::now().as_second())
}

/// Base 62 of a 160-bit big-endian number, left-padded with `0` to 27 characters.
fn encode(bytes: &[u8; 20]) -> String {
    // Repeated division of the big number (as base-2^32 digits) by 62.
    let mut digits: Vec<u32> = bytes
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut out = Vec::with_capacity(LEN);
    while digits.iter().any(|&d| d != 0) {
        let mut remainder: u64 = 0;
        for d in digits.iter_mut() {
            let value = (remainder << 32) | u64::from(*d);
            *d = (value / 62) as u32;
            remainder = value % 62;
        }
        out.push(ALPHABET[remainder as usize]);
    }
    while out.len() < LEN {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).expect("base-62 alphabet is ASCII")
}

/// Whether `s` looks like a KSUID (27 base-62 characters).
pub fn is_valid(s: &str) -> bool {
    s.len() == LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_values() {
        // The largest 160-bit value is the documented maximum KSUID.
        assert_eq!(encode(&[0xff; 20]), "aWgEPTl1tmebfsQzFP4bxwgy80V");
        assert_eq!(encode(&[0; 20]), "000000000000000000000000000");
    }

    #[test]
    fn new_ids_are_valid_unique_and_time_ordered() {
        let a = new_at(1_700_000_000);
        let b = new_at(1_800_000_000);
        assert!(is_valid(&a) && is_valid(&b));
        assert!(a < b, "later KSUIDs sort after earlier ones");
        assert_ne!(new(), new());
    }
}
