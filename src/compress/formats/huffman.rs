//! Canonical Huffman coding of byte symbols, the `packed` format's `entropy: "huffman"`
//! (Deep Compression's third stage: the codes and the relative-index gaps of a pruned,
//! weight-shared layer are far from uniform, so a prefix code stores them in fewer bits).
//!
//! # Stream layout
//! A code is described only by its **code lengths**: one byte per symbol of the alphabet
//! (`0` = the symbol does not occur, else `1 ..= 24` bits). Codes are assigned canonically,
//! as DEFLATE does (RFC 1951 §3.2.2): symbols sorted by (length, symbol value) receive
//! consecutive code values, the first code of length `L` being
//! `(first(L − 1) + count(L − 1)) << 1` with `first(0) = count(0) = 0`. An alphabet with one
//! used symbol gives it the 1-bit code `0`.
//!
//! The stream is the codes of the symbols in order, each written most significant bit
//! first, bits filling each byte from its most significant bit (bit `k` of the stream is bit
//! `7 − k mod 8` of byte `k / 8`); the last byte is zero-padded and the stream has exactly
//! `⌈total bits / 8⌉` bytes.
//!
//! Decoding reads one bit at a time, `code = code << 1 | bit`, until `code − first(L)` is
//! below `count(L)` for the current length `L`; the symbol is then the
//! `(code − first(L))`-th of length `L` in symbol order. [`decode`] refuses lengths that
//! over-subscribe the code space (Kraft sum above 1), a stream that ends early or reads a
//! code no symbol has, and trailing bytes.

/// Longest code written (counts are flattened until every code fits).
pub const MAX_CODE_LEN: u8 = 24;

/// Why a stream or its lengths cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HuffmanError(String);

/// Canonical code lengths for symbols occurring `counts[s]` times (one entry per symbol of
/// the alphabet, at most 256), no longer than [`MAX_CODE_LEN`]: Huffman's construction,
/// repeated on halved counts (non-zero counts stay ≥ 1) while the longest code is too long.
pub fn code_lengths(counts: &[u64]) -> Vec<u8> {
    let mut counts = counts.to_vec();
    loop {
        let lengths = unlimited_lengths(&counts);
        if lengths.iter().all(|&l| l <= MAX_CODE_LEN) {
            return lengths;
        }
        for c in counts.iter_mut().filter(|c| **c > 0) {
            *c = (*c / 2).max(1);
        }
    }
}

fn unlimited_lengths(counts: &[u64]) -> Vec<u8> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut lengths = vec![0u8; counts.len()];
    let used: Vec<usize> = (0..counts.len()).filter(|&s| counts[s] > 0).collect();
    match used.len() {
        0 => return lengths,
        1 => {
            lengths[used[0]] = 1;
            return lengths;
        }
        _ => {}
    }
    // Nodes 0..n are leaves; merged nodes follow. Ties break on the node index, so the
    // lengths are deterministic.
    let mut parent: Vec<usize> = vec![usize::MAX; used.len()];
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = used
        .iter()
        .enumerate()
        .map(|(i, &s)| Reverse((counts[s], i)))
        .collect();
    while heap.len() > 1 {
        let (Some(Reverse((a, i))), Some(Reverse((b, j)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let node = parent.len();
        parent.push(usize::MAX);
        parent[i] = node;
        parent[j] = node;
        heap.push(Reverse((a + b, node)));
    }
    // Depth of every node, computed from the root down (parents come after children).
    let mut depth = vec![0u32; parent.len()];
    for n in (0..parent.len()).rev() {
        if parent[n] != usize::MAX {
            depth[n] = depth[parent[n]] + 1;
        }
    }
    for (i, &s) in used.iter().enumerate() {
        lengths[s] = depth[i].min(255) as u8;
    }
    lengths
}

/// The canonical code of every symbol (`(code, length)`; length 0 = unused).
fn canonical_codes(lengths: &[u8]) -> Vec<(u32, u8)> {
    let mut count = [0u32; MAX_CODE_LEN as usize + 1];
    for &l in lengths.iter().filter(|&&l| l > 0) {
        count[l as usize] += 1;
    }
    let mut next = [0u32; MAX_CODE_LEN as usize + 2];
    let mut code = 0u32;
    for l in 1..=MAX_CODE_LEN as usize {
        code = (code + count[l - 1]) << 1;
        next[l] = code;
    }
    lengths
        .iter()
        .map(|&l| {
            if l == 0 {
                return (0, 0);
            }
            let c = next[l as usize];
            next[l as usize] += 1;
            (c, l)
        })
        .collect()
}

/// Bits the stream of symbols with these `counts` takes under `lengths`.
pub fn encoded_bits(counts: &[u64], lengths: &[u8]) -> u64 {
    counts
        .iter()
        .zip(lengths)
        .map(|(&c, &l)| c * u64::from(l))
        .sum()
}

/// How often each byte value occurs in `symbols` (256 entries).
pub fn histogram(symbols: &[u8]) -> Vec<u64> {
    let mut counts = vec![0u64; 256];
    for &s in symbols {
        counts[s as usize] += 1;
    }
    counts
}

/// The stream of `symbols` under `lengths` (see the module documentation). Every symbol must
/// have a non-zero length: the caller built `lengths` from these symbols' counts.
pub fn encode(symbols: &[u8], lengths: &[u8]) -> Vec<u8> {
    let codes = canonical_codes(lengths);
    let mut out = Vec::with_capacity(symbols.len() / 2 + 8);
    let (mut acc, mut filled) = (0u64, 0u32);
    for &s in symbols {
        let (code, len) = codes.get(s as usize).copied().unwrap_or((0, 0));
        debug_assert!(len > 0, "symbol {s} has no code");
        acc = (acc << len) | u64::from(code);
        filled += u32::from(len);
        while filled >= 8 {
            filled -= 8;
            out.push((acc >> filled) as u8);
        }
        acc &= (1u64 << filled) - 1;
    }
    if filled > 0 {
        out.push((acc << (8 - filled)) as u8);
    }
    out
}

/// Decodes exactly `n` symbols from `bytes` under `lengths` (see the module documentation).
pub fn decode(bytes: &[u8], lengths: &[u8], n: usize) -> Result<Vec<u8>, HuffmanError> {
    if lengths.len() > 256 {
        return Err(HuffmanError(format!(
            "{} code lengths (at most 256 symbols)",
            lengths.len()
        )));
    }
    if let Some(&l) = lengths.iter().find(|&&l| l > MAX_CODE_LEN) {
        return Err(HuffmanError(format!(
            "code length {l} (at most {MAX_CODE_LEN})"
        )));
    }
    // Kraft: Σ 2^(−l) ≤ 1, counted in units of 2^(−MAX_CODE_LEN).
    let kraft: u64 = lengths
        .iter()
        .filter(|&&l| l > 0)
        .map(|&l| 1u64 << (MAX_CODE_LEN - l))
        .sum();
    if kraft > 1u64 << MAX_CODE_LEN {
        return Err(HuffmanError(
            "code lengths over-subscribe the code space (Kraft sum above 1)".into(),
        ));
    }
    let mut count = [0u32; MAX_CODE_LEN as usize + 1];
    for &l in lengths.iter().filter(|&&l| l > 0) {
        count[l as usize] += 1;
    }
    // Symbols in canonical order, and per length its first code and first index there.
    let mut sorted: Vec<u8> = (0..lengths.len())
        .filter(|&s| lengths[s] > 0)
        .map(|s| s as u8)
        .collect();
    sorted.sort_by_key(|&s| (lengths[s as usize], s));
    let mut first_code = [0u32; MAX_CODE_LEN as usize + 1];
    let mut first_index = [0u32; MAX_CODE_LEN as usize + 1];
    let (mut code, mut index) = (0u32, 0u32);
    for l in 1..=MAX_CODE_LEN as usize {
        code = (code + count[l - 1]) << 1;
        index += count[l - 1];
        first_code[l] = code;
        first_index[l] = index;
    }
    if n > 0 && sorted.is_empty() {
        return Err(HuffmanError(format!(
            "{n} symbols to decode but no symbol has a code"
        )));
    }
    let total_bits = bytes.len() as u64 * 8;
    let mut out = Vec::with_capacity(n);
    let mut pos = 0u64;
    while out.len() < n {
        let (mut code, mut len) = (0u32, 0usize);
        loop {
            if pos >= total_bits {
                return Err(HuffmanError(format!(
                    "the stream ends after {} of {n} symbols",
                    out.len()
                )));
            }
            let bit = (bytes[(pos / 8) as usize] >> (7 - pos % 8)) & 1;
            pos += 1;
            code = (code << 1) | u32::from(bit);
            len += 1;
            let offset = code.wrapping_sub(first_code[len]);
            if code >= first_code[len] && offset < count[len] {
                out.push(sorted[(first_index[len] + offset) as usize]);
                break;
            }
            if len == MAX_CODE_LEN as usize {
                return Err(HuffmanError(format!(
                    "bits at symbol {} match no code",
                    out.len()
                )));
            }
        }
    }
    if pos.div_ceil(8) != bytes.len() as u64 {
        return Err(HuffmanError(format!(
            "{} bytes of stream, {} hold the {n} symbols",
            bytes.len(),
            pos.div_ceil(8)
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn round_trips_skewed_and_uniform_alphabets() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for alphabet in [1usize, 2, 3, 16, 32, 256] {
            // Geometric-ish: small symbols much more frequent.
            let symbols: Vec<u8> = (0..10_000)
                .map(|_| {
                    let u: f64 = rng.gen::<f64>().max(1e-12);
                    ((-u.ln() * 3.0) as usize % alphabet) as u8
                })
                .collect();
            let counts = histogram(&symbols);
            let lengths = code_lengths(&counts);
            let bytes = encode(&symbols, &lengths);
            assert_eq!(
                bytes.len() as u64,
                encoded_bits(&counts, &lengths).div_ceil(8)
            );
            assert_eq!(decode(&bytes, &lengths, symbols.len()).unwrap(), symbols);
            // Within one bit per symbol of the entropy (Huffman's bound).
            let n = symbols.len() as f64;
            let entropy: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| -(c as f64) * (c as f64 / n).log2())
                .sum();
            let bits = encoded_bits(&counts, &lengths) as f64;
            assert!(bits >= entropy - 1e-6 && bits <= entropy + n, "{alphabet}");
        }
    }

    #[test]
    fn canonical_codes_follow_deflate() {
        // RFC 1951's example: lengths (3, 3, 3, 3, 3, 2, 4, 4) for A..H.
        let codes = canonical_codes(&[3, 3, 3, 3, 3, 2, 4, 4]);
        let want = [
            (0b010, 3),
            (0b011, 3),
            (0b100, 3),
            (0b101, 3),
            (0b110, 3),
            (0b00, 2),
            (0b1110, 4),
            (0b1111, 4),
        ];
        assert_eq!(codes, want);
        // F (5) then A (0) then H (7): 00 010 1111 → 0001 0111 1(000 0000)
        assert_eq!(
            encode(&[5, 0, 7], &[3, 3, 3, 3, 3, 2, 4, 4]),
            vec![0b0001_0111, 0b1000_0000]
        );
    }

    #[test]
    fn lengths_are_limited_on_fibonacci_counts() {
        // Fibonacci counts make an unbalanced tree 39 deep without a limit.
        let mut counts = vec![0u64; 40];
        let (mut a, mut b) = (1u64, 1u64);
        for c in counts.iter_mut() {
            *c = a;
            (a, b) = (b, a + b);
        }
        assert!(unlimited_lengths(&counts).iter().any(|&l| l > MAX_CODE_LEN));
        let lengths = code_lengths(&counts);
        assert!(lengths.iter().all(|&l| (1..=MAX_CODE_LEN).contains(&l)));
        let symbols: Vec<u8> = (0..40u8).chain([39, 39, 38]).collect();
        let bytes = encode(&symbols, &lengths);
        assert_eq!(decode(&bytes, &lengths, symbols.len()).unwrap(), symbols);
    }

    #[test]
    fn single_symbol_and_empty_streams() {
        let lengths = code_lengths(&histogram(&[7, 7, 7]));
        assert_eq!(lengths[7], 1);
        let bytes = encode(&[7, 7, 7], &lengths);
        assert_eq!(bytes, vec![0]);
        assert_eq!(decode(&bytes, &lengths, 3).unwrap(), vec![7, 7, 7]);
        assert_eq!(decode(&[], &[0; 4], 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn malformed_streams_are_refused() {
        let lengths = [1u8, 2, 2];
        let bytes = encode(&[0, 1, 2, 0], &lengths); // 0 10 11 0 → 0101 10(00)
        assert_eq!(bytes, vec![0b0101_1000]);
        // Ends early, trailing bytes, over-subscribed lengths, too long a length.
        assert!(decode(&bytes, &lengths, 9).is_err());
        assert!(decode(&[0b0101_1000, 0], &lengths, 4).is_err());
        assert!(decode(&bytes, &[1, 1, 1], 4).is_err());
        assert!(decode(&bytes, &[1, 25], 4).is_err());
        assert!(decode(&bytes, &[0, 0], 1).is_err());
        // An incomplete code (only `0` assigned): a `1` bit matches nothing.
        assert!(decode(&[0b1000_0000], &[1], 1).is_err());
    }
}
