//! A request: seeded GLWE ciphertexts of which only the modulus-switched, bit-packed bodies
//! travel, with one seed for the masks. Where each value sits is its encoding's (`row.rs`,
//! `blocked.rs`, `slot.rs`, `auto.rs`).

use serde::{Deserialize, Serialize};

use crate::fhe::bitpack::packed_len;
use crate::fhe::codec::{CodecError, Wire};
use crate::fhe::params::{Encoding, AUTO_OUTPUTS, BLOCK_ROWS, MAX_IN_FEATURES};

/// Most rows one request may carry: bounds the masks the server regenerates per call.
pub const MAX_ROWS: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EncryptedRows {
    pub rows: u32,
    pub in_features: u32,
    pub body_bits: u8,
    /// 16-byte seed of every mask in this request.
    #[serde(with = "serde_bytes")]
    pub seed: Vec<u8>,
    /// `rows × in_features` bodies of `body_bits` bits each, row-major in every encoding.
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
    /// How the rows sit in ciphertexts (requests made before encodings existed are rows).
    #[serde(default)]
    pub encoding: Encoding,
}

impl EncryptedRows {
    pub fn seed(&self) -> u128 {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&self.seed);
        u128::from_le_bytes(bytes)
    }

    pub fn wire_len(&self) -> usize {
        self.seed.len() + self.bodies.len()
    }
}

impl Wire for EncryptedRows {
    const KIND: u8 = 2;
    const NAME: &'static str = "encrypted rows";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        let (rows, cols) = (self.rows as usize, self.in_features as usize);
        if !(1..=MAX_ROWS).contains(&rows) {
            return Err(CodecError::invalid::<Self>(format!(
                "{rows} rows, expected 1..={MAX_ROWS}"
            )));
        }
        if !(1..=MAX_IN_FEATURES).contains(&cols) {
            return Err(CodecError::invalid::<Self>(format!(
                "{cols} input features, expected 1..={MAX_IN_FEATURES}"
            )));
        }
        if !(1..=64).contains(&self.body_bits) {
            return Err(CodecError::invalid::<Self>(format!(
                "body width of {} bits",
                self.body_bits
            )));
        }
        if self.seed.len() != 16 {
            return Err(CodecError::invalid::<Self>(format!(
                "seed of {} bytes, expected 16",
                self.seed.len()
            )));
        }
        if let Encoding::Blocked { rows: block } = self.encoding {
            if !BLOCK_ROWS.contains(&block) {
                return Err(CodecError::invalid::<Self>(format!(
                    "blocks of {block} rows (this build offers {BLOCK_ROWS:?})"
                )));
            }
        }
        if let Encoding::Auto { outputs } = self.encoding {
            if !AUTO_OUTPUTS.contains(&outputs) {
                return Err(CodecError::invalid::<Self>(format!(
                    "{outputs} outputs per product (this build offers {AUTO_OUTPUTS:?})"
                )));
            }
        }
        let want = packed_len(
            self.encoding.input_bodies(rows, cols),
            self.body_bits as u32,
        );
        if self.bodies.len() != want {
            return Err(CodecError::invalid::<Self>(format!(
                "{} body bytes for {rows}×{cols} values of {} bits, expected {want}",
                self.bodies.len(),
                self.body_bits
            )));
        }
        Ok(())
    }
}
