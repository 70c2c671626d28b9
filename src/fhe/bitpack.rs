//! Dense bit packing of modulus-switched coefficients (`bits` per value, little-endian bit order).

/// Bytes needed for `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Round each 64-bit torus value to its top `bits` bits (modulus switch to `2^bits`) and pack.
pub fn pack_top_bits(values: impl IntoIterator<Item = u64>, bits: u32, out: &mut Vec<u8>) {
    debug_assert!((1..=64).contains(&bits));
    let shift = 64 - bits;
    let mut acc: u128 = 0;
    let mut filled = 0u32;
    for v in values {
        let rounded = if shift == 0 {
            v
        } else {
            // Round to nearest, wrapping: the top value rounds to 0 mod 2^bits.
            (v >> shift).wrapping_add((v >> (shift - 1)) & 1) & mask(bits)
        };
        acc |= (rounded as u128) << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
}

/// Inverse of [`pack_top_bits`]: each value is scaled back to the 64-bit torus (low bits zero).
/// The caller checks `bytes.len() == packed_len(count, bits)`.
pub fn unpack_top_bits(bytes: &[u8], count: usize, bits: u32) -> impl Iterator<Item = u64> + '_ {
    debug_assert!(bytes.len() >= packed_len(count, bits));
    let shift = 64 - bits;
    let mut acc: u128 = 0;
    let mut filled = 0u32;
    let mut pos = 0usize;
    (0..count).map(move |_| {
        while filled < bits {
            acc |= (bytes[pos] as u128) << filled;
            pos += 1;
            filled += 8;
        }
        let v = (acc as u64) & mask(bits);
        acc >>= bits;
        filled -= bits;
        v << shift
    })
}

fn mask(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_the_top_bits_rounded() {
        for bits in [1u32, 7, 28, 33, 44, 63, 64] {
            let values: Vec<u64> = (0..37u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            let mut packed = Vec::new();
            pack_top_bits(values.iter().copied(), bits, &mut packed);
            assert_eq!(packed.len(), packed_len(values.len(), bits));
            let back: Vec<u64> = unpack_top_bits(&packed, values.len(), bits).collect();
            let half = if bits == 64 { 0 } else { 1u64 << (63 - bits) };
            for (v, b) in values.iter().zip(&back) {
                let err = v.wrapping_sub(*b) as i64;
                assert!(err.unsigned_abs() <= half, "bits {bits}: {v:#x} -> {b:#x}");
            }
        }
    }
}
