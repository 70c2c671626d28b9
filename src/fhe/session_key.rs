//! What a worker holds for one session: the uploaded [`EvaluationKey`] transformed to the Fourier
//! domain, as three independent parts. Each encoding and each kind of module takes the part it
//! needs: the LWE packing keys (row and blocked encodings, and the final pack of a non-linear
//! chain), the automorphism keys (the `auto` encoding) and the bootstrapping keys (the tables of
//! a non-linear chain).

use super::automorph::FourierAutoKeys;
use super::keys::EvaluationKey;
use super::packing::{FourierEntries, FourierPackingKey};
use super::params::{KeyProfile, Precision};
use super::pbs::FourierBootstrapKey;

/// A session's evaluation keys, transformed once when they are loaded.
pub struct SessionKey {
    pub precision: Precision,
    /// A lean key carries the automorphism keys alone: its packing keys are empty, and such
    /// sessions serve `auto` and `slot` requests (checked before any evaluation).
    pub profile: KeyProfile,
    pub packing: FourierPackingKey,
    /// The automorphism keys (exact precision, keys made since they exist).
    pub auto: Option<FourierAutoKeys>,
    /// Keyswitching and bootstrapping keys, if the session uploaded them (non-linear modules).
    pub bootstrap: Option<FourierBootstrapKey>,
}

impl SessionKey {
    /// Regenerate every seeded mask and transform every key polynomial (parallel, on the
    /// current rayon pool).
    pub fn new(key: &EvaluationKey) -> Self {
        let params = key.params;
        Self {
            precision: key.precision,
            profile: key.profile,
            packing: FourierPackingKey {
                precision: key.precision,
                params,
                row: FourierEntries::new(params, &key.seeds, &key.bodies),
                blocks: key
                    .blocks
                    .iter()
                    .map(|b| {
                        (
                            b.rows as usize,
                            FourierEntries::new(params, &b.seeds, &b.bodies),
                        )
                    })
                    .collect(),
            },
            auto: key.auto.as_ref().map(FourierAutoKeys::new),
            // A decoded key was checked against this build's parameters, so `new` succeeds.
            bootstrap: key
                .bootstrap
                .as_ref()
                .and_then(|b| FourierBootstrapKey::new(b).ok()),
        }
    }

    /// Memory held by the transformed keys.
    pub fn size_bytes(&self) -> usize {
        self.packing.size_bytes()
            + self.auto.as_ref().map_or(0, FourierAutoKeys::size_bytes)
            + self
                .bootstrap
                .as_ref()
                .map_or(0, FourierBootstrapKey::size_bytes)
    }
}
