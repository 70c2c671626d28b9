//! The only module that touches `tfhe`: parameters, keys, the encrypted linear-layer engine and the
//! codecs of everything it sends. It knows nothing of HTTP, Redis or models.
//!
//! Client: [`ClientKey::generate`] → [`ClientKey::evaluation_key`] (uploaded) →
//! [`ClientKey::encrypt_rows`] → … → [`ClientKey::decrypt_outputs`].
//! Server: [`FourierPackingKey::new`] (once per session) and [`FourierLinearLayer::new`] (once per
//! layer) → [`FourierLinearLayer::evaluate`] per request.

mod auto;
mod automorph;
pub mod bitpack;
mod blocked;
mod chain;
pub mod codec;
mod encrypted_outputs;
mod encrypted_rows;
mod fourier;
mod keys;
mod linear;
mod packing;
pub mod params;
pub mod pbs;
mod seeded;
mod slot;

pub use auto::AutoLayout;
pub use automorph::{AutoKey, FourierAutoKeys};
pub use blocked::{BlockLayout, CIPHERTEXTS_PER_SEED};
pub use chain::{
    chain_rows_within, gain_within_noise, table_input_variance, table_lookup, whole_maps,
    ChainProgram, ChainStage, EncryptedChain, ModuleProgram, MAX_TABLE_GAIN,
};
pub use codec::{decode, encode, CodecError, Wire};
pub use encrypted_outputs::{decode as decode_phase, EncryptedOutputs};
pub use encrypted_rows::{EncryptedRows, MAX_ROWS};
pub use keys::{BlockKey, ClientKey, EvaluationKey};
pub use linear::{
    digit_bytes_per_output, outputs_per_group, FourierLinearLayer, DEFAULT_JOB_BYTES,
};
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
