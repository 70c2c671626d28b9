//! Secret keys (client only) and the evaluation key a client uploads for a session.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::commons::math::random::Seed;
use tfhe::core_crypto::prelude::{
    allocate_and_generate_new_binary_glwe_secret_key, new_seeder, DefaultRandomGenerator,
    GlweDimension, GlweSecretKeyOwned, LweSecretKeyOwned, PolynomialSize, SecretRandomGenerator,
};

use super::automorph::{entry_key_poly, AutoKey};
use super::codec::{CodecError, Wire};
use super::params::{
    auto_params, packing_params, GlweShape, KeyProfile, PackingParams, Precision, BLOCK_ROWS,
    INPUT_GLWE,
};
use super::pbs::BootstrapKey;
use super::seeded::encrypt;

/// A client's secret keys: the input GLWE key and one output key per precision. Never leaves the
/// client.
pub struct ClientKey {
    pub(crate) input: GlweSecretKeyOwned<u64>,
    pub(crate) exact_output: GlweSecretKeyOwned<u64>,
    pub(crate) compact_output: GlweSecretKeyOwned<u64>,
    /// The small LWE key bootstraps run under (see `pbs.rs`).
    pub(crate) small: LweSecretKeyOwned<u64>,
}

fn generate_glwe_key(
    shape: GlweShape,
    generator: &mut SecretRandomGenerator<DefaultRandomGenerator>,
) -> GlweSecretKeyOwned<u64> {
    allocate_and_generate_new_binary_glwe_secret_key(
        GlweDimension(shape.glwe_dimension),
        PolynomialSize(shape.polynomial_size),
        generator,
    )
}

impl ClientKey {
    /// Fresh secret keys from the operating system's entropy.
    pub fn generate() -> Self {
        let mut seeder = new_seeder();
        let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
        Self {
            input: generate_glwe_key(INPUT_GLWE, &mut generator),
            exact_output: generate_glwe_key(
                packing_params(Precision::Exact).output,
                &mut generator,
            ),
            compact_output: generate_glwe_key(
                packing_params(Precision::Compact).output,
                &mut generator,
            ),
            small: super::pbs::generate_small_key(),
        }
    }

    /// The bootstrapping keys a session needs for non-linear modules (about 60 MiB, seeded; a
    /// second or so on two cores).
    pub fn bootstrap_key(&self) -> BootstrapKey {
        super::pbs::generate_bootstrap_key(&self.input, &self.small)
    }

    pub(crate) fn output_key(&self, precision: Precision) -> &GlweSecretKeyOwned<u64> {
        match precision {
            Precision::Exact => &self.exact_output,
            Precision::Compact => &self.compact_output,
        }
    }

    /// The packing keys for `precision`, seeded: only bodies are produced, the server
    /// regenerates the masks from one seed per key entry. The row key has one entry per
    /// input-key coefficient; each block size of [`BLOCK_ROWS`] adds `N/rows` entries. Slow
    /// (seconds): `progress` is called with the number of entries done since the last call
    /// ([`EvaluationKey::entries`] in all).
    pub fn evaluation_key(
        &self,
        precision: Precision,
        progress: &(dyn Fn(usize) + Sync),
    ) -> EvaluationKey {
        let params = packing_params(precision);
        let input_key = self.input.as_ref();
        // Row key: entry t encrypts s_t as a constant polynomial.
        let (seeds, bodies) = self.key_entries(precision, input_key.len(), progress, |t, poly| {
            poly[0] = input_key[t];
        });
        let blocks = BLOCK_ROWS
            .iter()
            .map(|&rows| {
                let block = rows as usize;
                let f = INPUT_GLWE.polynomial_size / block;
                // Entry u encrypts σ_u(X^F) = Σ_p s[p·F + (F − u) mod F] · X^(p·F): the key of mask
                // polynomial u of a product reinterpreted in the subring Z[X^F] (see `blocked.rs`).
                let (seeds, bodies) = self.key_entries(precision, f, progress, |u, poly| {
                    let v = (f - u) % f;
                    for p in 0..block {
                        poly[p * f] = input_key[p * f + v];
                    }
                });
                BlockKey {
                    rows,
                    seeds,
                    bodies,
                }
            })
            .collect();
        // 22 entries against the row key's 2048: not worth a place in the progress count.
        let auto = (precision == Precision::Exact).then(|| self.auto_key(&|_| ()));
        EvaluationKey {
            precision,
            params,
            seeds,
            bodies,
            blocks,
            bootstrap: None,
            auto,
            profile: KeyProfile::Full,
        }
    }

    /// The evaluation key of `profile` for `precision`: [`ClientKey::evaluation_key`], or the
    /// lean key (the automorphism keys alone, about 1 MiB and milliseconds to make; none at all
    /// at compact precision, whose lean sessions serve slot requests only).
    pub fn evaluation_key_as(
        &self,
        precision: Precision,
        profile: KeyProfile,
        progress: &(dyn Fn(usize) + Sync),
    ) -> EvaluationKey {
        match profile {
            KeyProfile::Full => self.evaluation_key(precision, progress),
            KeyProfile::Lean => EvaluationKey {
                precision,
                params: packing_params(precision),
                seeds: Vec::new(),
                bodies: Vec::new(),
                blocks: Vec::new(),
                bootstrap: None,
                auto: (precision == Precision::Exact).then(|| self.auto_key(&|_| ())),
                profile,
            },
        }
    }

    /// The automorphism keys (`automorph.rs`): entry `(s − 1)·k + i` encrypts `τ_{2^s+1}(s_i)`
    /// under the exact output key itself.
    pub fn auto_key(&self, progress: &(dyn Fn(usize) + Sync)) -> AutoKey {
        let params = auto_params();
        let out = params.output;
        let key = self.exact_output.as_ref();
        let (n, kk) = (out.polynomial_size, out.glwe_dimension);
        let (seeds, bodies) = glwe_key_entries(
            params,
            &self.exact_output,
            AutoKey::entries(),
            progress,
            |e, poly| entry_key_poly(e, key, n, kk, poly),
        );
        AutoKey { seeds, bodies }
    }

    /// `entries × levels` seeded GLWEs under the output key of `params`: level `l` of entry `e`
    /// encrypts `key_poly(e) · q / B^(l+1)`, where `key_poly` writes binary key coefficients.
    fn key_entries(
        &self,
        precision: Precision,
        entries: usize,
        progress: &(dyn Fn(usize) + Sync),
        key_poly: impl Fn(usize, &mut [u64]) + Sync,
    ) -> (Vec<u8>, Vec<u8>) {
        glwe_key_entries(
            packing_params(precision),
            self.output_key(precision),
            entries,
            progress,
            key_poly,
        )
    }
}

/// `entries × levels` seeded GLWEs under `output_key` (the shape of `params.output`): level `l`
/// of entry `e` encrypts `key_poly(e) · q / B^(l+1)`, `B = 2^params.base_log`.
fn glwe_key_entries(
    params: PackingParams,
    output_key: &GlweSecretKeyOwned<u64>,
    entries: usize,
    progress: &(dyn Fn(usize) + Sync),
    key_poly: impl Fn(usize, &mut [u64]) + Sync,
) -> (Vec<u8>, Vec<u8>) {
    let out = params.output;
    let levels = params.level_count;
    let n_out = out.polynomial_size;
    let per_entry = levels * n_out;
    let mut bodies = vec![0u64; entries * per_entry];
    let seeds: Vec<[u8; 16]> = bodies
        .par_chunks_mut(per_entry)
        .enumerate()
        .map(|(e, chunk)| {
            let seed = new_seeder().seed().0;
            let mut key = vec![0u64; n_out];
            key_poly(e, &mut key);
            let mut plain = vec![0u64; per_entry];
            for l in 0..levels {
                let shift = 64 - params.base_log * (l as u32 + 1);
                for (dst, &s) in plain[l * n_out..(l + 1) * n_out].iter_mut().zip(&key) {
                    *dst = s << shift;
                }
            }
            chunk.copy_from_slice(&encrypt(output_key, out, &plain, seed));
            progress(1);
            seed.to_le_bytes()
        })
        .collect();
    (
        seeds.concat(),
        bodies.iter().flat_map(|b| b.to_le_bytes()).collect(),
    )
}

/// The small packing key of one block size (blocked encoding), seeded like the row key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BlockKey {
    /// Rows per input ciphertext; the key has `N/rows` entries.
    pub rows: u32,
    #[serde(with = "serde_bytes")]
    pub seeds: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
}

impl BlockKey {
    pub fn entries(&self) -> usize {
        INPUT_GLWE.polynomial_size / self.rows as usize
    }
}

/// The session's evaluation key for one precision, as uploaded: the packing keyswitch key from the
/// input key to that precision's output key, seeded (bodies only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvaluationKey {
    pub precision: Precision,
    pub params: PackingParams,
    /// 16-byte mask seed per input-key coefficient.
    #[serde(with = "serde_bytes")]
    pub seeds: Vec<u8>,
    /// Little-endian `u64` bodies, `n_in × levels × N_out`.
    #[serde(with = "serde_bytes")]
    pub bodies: Vec<u8>,
    /// The blocked encoding's keys, one per block size; keys made before it existed have none
    /// (their sessions accept row requests only).
    #[serde(default)]
    pub blocks: Vec<BlockKey>,
    /// Keyswitching and bootstrapping keys, for sessions whose modules have activations inside
    /// (see `pbs.rs`); absent otherwise.
    #[serde(default)]
    pub bootstrap: Option<BootstrapKey>,
    /// The automorphism keys (exact precision; keys made before they existed have none, and their
    /// sessions serve no automorphism requests).
    #[serde(default)]
    pub auto: Option<AutoKey>,
    /// Which keys this is: a lean key has no row or block keys (`seeds`, `bodies` and `blocks`
    /// empty) and serves `auto` and `slot` requests only. Keys of version 1 are full.
    #[serde(default)]
    pub profile: KeyProfile,
}

impl EvaluationKey {
    pub fn input_dimension(&self) -> usize {
        INPUT_GLWE.lwe_dimension()
    }

    pub fn seed(&self, t: usize) -> Seed {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&self.seeds[t * 16..(t + 1) * 16]);
        Seed(u128::from_le_bytes(bytes))
    }

    /// Bytes as uploaded.
    pub fn wire_len(&self) -> usize {
        self.seeds.len()
            + self.bodies.len()
            + self
                .blocks
                .iter()
                .map(|b| b.seeds.len() + b.bodies.len())
                .sum::<usize>()
            + self.bootstrap.as_ref().map_or(0, BootstrapKey::wire_len)
            + self.auto.as_ref().map_or(0, AutoKey::wire_len)
    }

    /// Key entries in all (row key and block keys): what [`ClientKey::evaluation_key`] reports
    /// progress in.
    pub fn entries() -> usize {
        INPUT_GLWE.lwe_dimension()
            + BLOCK_ROWS
                .iter()
                .map(|&r| INPUT_GLWE.polynomial_size / r as usize)
                .sum::<usize>()
    }

    /// Exact payload size of an evaluation key of `precision` (row key and every block key).
    pub fn expected_len(precision: Precision) -> usize {
        let p = packing_params(precision);
        let auto = match precision {
            Precision::Exact => AutoKey::expected_len(),
            Precision::Compact => 0,
        };
        Self::entries() * (16 + p.level_count * p.output.polynomial_size * 8) + auto
    }

    /// The most an evaluation key of `precision` can weigh: with bootstrapping keys.
    pub fn max_len(precision: Precision) -> usize {
        Self::expected_len(precision) + BootstrapKey::expected_len()
    }
}

impl Wire for EvaluationKey {
    const KIND: u8 = 1;
    const NAME: &'static str = "evaluation key";
    /// Version 2 added lean keys (`profile`); version 1 keys load as full keys.
    const VERSION: u16 = 2;
    const OLDEST_VERSION: u16 = 1;

    /// Version 1 keys carry automorphism keys of the first layout (`β = 12, L = 4`) when they
    /// carry any: those cannot be read as this build's; keys without them load as full keys.
    fn check_version(&self, version: u16) -> Result<(), CodecError> {
        if version < 2 && self.auto.is_some() {
            return Err(CodecError::invalid::<Self>(format!(
                "version {version} keys carry automorphism keys of an older layout (β = 12, L = 4); \
                 this build's are version 2 (β = 15, L = 3): generate the session's keys with a \
                 current client"
            )));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), CodecError> {
        if self.params != packing_params(self.precision) {
            return Err(CodecError::invalid::<Self>(format!(
                "parameters {:?} do not match the {} parameter set of this build",
                self.params, self.precision
            )));
        }
        let n_in = INPUT_GLWE.lwe_dimension();
        let per_entry = self.params.level_count * self.params.output.polynomial_size * 8;
        if self.profile == KeyProfile::Lean {
            // Nothing but the automorphism keys (exact precision), and no bootstrapping keys:
            // chains pack with the row key.
            let stray = [
                (
                    !self.seeds.is_empty() || !self.bodies.is_empty(),
                    "a row key",
                ),
                (!self.blocks.is_empty(), "block keys"),
                (self.bootstrap.is_some(), "bootstrapping keys"),
                (
                    self.auto.is_none() && self.precision == Precision::Exact,
                    "no automorphism keys",
                ),
            ];
            if let Some((_, what)) = stray.iter().find(|(bad, _)| *bad) {
                return Err(CodecError::invalid::<Self>(format!(
                    "a lean {} key with {what} (lean keys carry the automorphism keys alone)",
                    self.precision
                )));
            }
        } else if self.seeds.len() != n_in * 16 || self.bodies.len() != n_in * per_entry {
            return Err(CodecError::invalid::<Self>(format!(
                "expected {} seed bytes and {} body bytes, got {} and {}",
                n_in * 16,
                n_in * per_entry,
                self.seeds.len(),
                self.bodies.len()
            )));
        }
        for (i, block) in self.blocks.iter().enumerate() {
            if !BLOCK_ROWS.contains(&block.rows)
                || self.blocks[..i].iter().any(|b| b.rows == block.rows)
            {
                return Err(CodecError::invalid::<Self>(format!(
                    "block key for {} rows per ciphertext (this build offers {BLOCK_ROWS:?}, each once)",
                    block.rows
                )));
            }
            let entries = block.entries();
            if block.seeds.len() != entries * 16 || block.bodies.len() != entries * per_entry {
                return Err(CodecError::invalid::<Self>(format!(
                    "block key for {} rows: expected {} seed bytes and {} body bytes, got {} and {}",
                    block.rows,
                    entries * 16,
                    entries * per_entry,
                    block.seeds.len(),
                    block.bodies.len()
                )));
            }
        }
        if let Some(b) = &self.bootstrap {
            b.check().map_err(CodecError::invalid::<Self>)?;
        }
        if let Some(a) = &self.auto {
            if self.precision != Precision::Exact {
                return Err(CodecError::invalid::<Self>(
                    "automorphism keys come with exact-precision keys only".to_string(),
                ));
            }
            a.check().map_err(CodecError::invalid::<Self>)?;
        }
        Ok(())
    }
}
