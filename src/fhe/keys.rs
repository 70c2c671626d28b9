//! Secret keys (client only) and the evaluation key a client uploads for a session.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    allocate_and_generate_new_binary_glwe_secret_key, encrypt_seeded_glwe_ciphertext_list,
    new_seeder, CiphertextModulus, DefaultRandomGenerator, DynamicDistribution,
    GlweCiphertextCount, GlweDimension, GlweSecretKeyOwned, PlaintextList, PolynomialSize,
    SecretRandomGenerator, SeededGlweCiphertextList,
};

use super::codec::{CodecError, Wire};
use super::params::{packing_params, GlweShape, PackingParams, Precision, INPUT_GLWE};

/// A client's secret keys: the input GLWE key and one output key per precision. Never leaves the
/// client.
pub struct ClientKey {
    pub(crate) input: GlweSecretKeyOwned<u64>,
    pub(crate) exact_output: GlweSecretKeyOwned<u64>,
    pub(crate) compact_output: GlweSecretKeyOwned<u64>,
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
        }
    }

    pub(crate) fn output_key(&self, precision: Precision) -> &GlweSecretKeyOwned<u64> {
        match precision {
            Precision::Exact => &self.exact_output,
            Precision::Compact => &self.compact_output,
        }
    }

    /// The packing keyswitch key for `precision`, seeded: only bodies are produced, the server
    /// regenerates the masks from one seed per input-key coefficient. Slow (seconds): `progress`
    /// is called with the number of input-key coefficients done since the last call.
    pub fn evaluation_key(
        &self,
        precision: Precision,
        progress: &(dyn Fn(usize) + Sync),
    ) -> EvaluationKey {
        let params = packing_params(precision);
        let out = params.output;
        let output_key = self.output_key(precision);
        let levels = params.level_count;
        let n_out = out.polynomial_size;
        let per_coefficient = levels * n_out;
        let input_key = self.input.as_ref();
        let mut bodies = vec![0u64; input_key.len() * per_coefficient];
        let seeds: Vec<[u8; 16]> = bodies
            .par_chunks_mut(per_coefficient)
            .zip(input_key.par_iter())
            .map(|(chunk, &s)| {
                let mut seeder = new_seeder();
                let seed = seeder.seed();
                let mut list = SeededGlweCiphertextList::new(
                    0u64,
                    tfhe::core_crypto::prelude::GlweSize(out.glwe_dimension + 1),
                    PolynomialSize(n_out),
                    GlweCiphertextCount(levels),
                    CompressionSeed::from(seed),
                    CiphertextModulus::new_native(),
                );
                // Level l encrypts s_t · q / B^(l+1) as a constant polynomial.
                let mut plain = vec![0u64; per_coefficient];
                for l in 0..levels {
                    plain[l * n_out] = s << (64 - params.base_log * (l as u32 + 1));
                }
                encrypt_seeded_glwe_ciphertext_list(
                    output_key,
                    &mut list,
                    &PlaintextList::from_container(plain),
                    DynamicDistribution::new_t_uniform(out.noise_bound_log2),
                    seeder.as_mut(),
                );
                chunk.copy_from_slice(list.as_ref());
                progress(1);
                seed.0.to_le_bytes()
            })
            .collect();
        EvaluationKey {
            precision,
            params,
            seeds: seeds.concat(),
            bodies: bodies.iter().flat_map(|b| b.to_le_bytes()).collect(),
        }
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
        self.seeds.len() + self.bodies.len()
    }

    /// Exact wire size of an evaluation key of `precision`.
    pub fn expected_len(precision: Precision) -> usize {
        let p = packing_params(precision);
        let n_in = INPUT_GLWE.lwe_dimension();
        n_in * 16 + n_in * p.level_count * p.output.polynomial_size * 8
    }
}

impl Wire for EvaluationKey {
    const KIND: u8 = 1;
    const NAME: &'static str = "evaluation key";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        if self.params != packing_params(self.precision) {
            return Err(CodecError::invalid::<Self>(format!(
                "parameters {:?} do not match the {} parameter set of this build",
                self.params, self.precision
            )));
        }
        let n_in = INPUT_GLWE.lwe_dimension();
        let want_bodies = n_in * self.params.level_count * self.params.output.polynomial_size * 8;
        if self.seeds.len() != n_in * 16 || self.bodies.len() != want_bodies {
            return Err(CodecError::invalid::<Self>(format!(
                "expected {} seed bytes and {want_bodies} body bytes, got {} and {}",
                n_in * 16,
                self.seeds.len(),
                self.bodies.len()
            )));
        }
        Ok(())
    }
}
