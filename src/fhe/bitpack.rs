//! Dense bit packing of modulus-switched coefficients (`bits` per value, little-endian bit order).

/// Bytes needed for `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u32) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Round each 64-bit torus value to its top `bits` bits (modulus switch to `2^bits`) and pack.
pub fn pack_top_bits(values: impl IntoIterator<Item = u64>, bits: u32, out: &mut Vec<u8>) {
    let mut packer = BitPacker::new(bits, out);
    values.into_iter().for_each(|v| packer.push(v));
    packer.finish();
}

/// [`pack_top_bits`] fed piece by piece: the engine packs one group of outputs at a time, and a
/// group's bit count need not end on a byte boundary.
pub struct BitPacker<'a> {
    bits: u32,
    acc: u128,
    filled: u32,
    out: &'a mut Vec<u8>,
}

impl<'a> BitPacker<'a> {
    pub fn new(bits: u32, out: &'a mut Vec<u8>) -> Self {
        debug_assert!((1..=64).contains(&bits));
        Self {
            bits,
            acc: 0,
            filled: 0,
            out,
        }
    }

    pub fn push(&mut self, v: u64) {
        let shift = 64 - self.bits;
        let rounded = if shift == 0 {
            v
        } else {
            // Round to nearest, wrapping: the top value rounds to 0 mod 2^bits.
            (v >> shift).wrapping_add((v >> (shift - 1)) & 1) & mask(self.bits)
        };
        self.acc |= (rounded as u128) << self.filled;
        self.filled += self.bits;
        while self.filled >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.filled -= 8;
        }
    }

    /// Flush the last partial byte.
    pub fn finish(self) {
        if self.filled > 0 {
            self.out.push(self.acc as u8);
        }
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
