//! The only module that touches `tfhe`: parameters, keys, the encrypted linear-layer engine and the
//! codecs of everything it sends. It knows nothing of HTTP, Redis or models.
//!
//! Client: [`ClientKey::generate`] → [`ClientKey::evaluation_key`] (uploaded) →
//! [`ClientKey::encrypt_rows`] → … → [`ClientKey::decrypt_outputs`].
//! Server: [`FourierPackingKey::new`] (once per session) and [`FourierLinearLayer::new`] (once per
//! layer) → [`FourierLinearLayer::evaluate`] per request.

mod automorph;
pub mod bitpack;
mod chain;
pub mod codec;
mod encoding;
mod fourier;
mod keys;
mod packing;
pub mod params;
pub mod pbs;
mod seeded;

pub use automorph::{AutoKey, FourierAutoKeys};
pub use chain::{
    chain_rows_within, gain_within_noise, table_input_variance, table_lookup, whole_maps,
    ChainProgram, ChainStage, EncryptedChain, ModuleProgram, MAX_TABLE_GAIN,
};
pub use codec::{decode, encode, CodecError, Wire};
pub use encoding::{
    decode as decode_phase, digit_bytes_per_output, outputs_per_group, AutoLayout, BlockLayout,
    EncryptedOutputs, EncryptedRows, FourierLinearLayer, CIPHERTEXTS_PER_SEED, DEFAULT_JOB_BYTES,
    MAX_ROWS,
};
pub use keys::{BlockKey, ClientKey, EvaluationKey};
pub use packing::FourierPackingKey;
pub use params::{Encoding, KeyProfile, LayerPlan, PlanError, Precision, AUTO_OUTPUTS, BLOCK_ROWS};
pub use pbs::{BootstrapKey, FourierBootstrapKey, PBS_PARAMS};

/// Errors of the encrypted engine; each names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum FheError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("value out of range: {0}")]
    ValueOutOfRange(String),
    #[error("parameter mismatch: {0}")]
    ParameterMismatch(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}
