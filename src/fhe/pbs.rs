//! Programmable bootstrapping: the non-linear step between two encrypted linear layers.
//!
//! A hidden accumulator leaves a linear layer as an LWE under the input GLWE key (dimension
//! `k·N = 2048`). The server keyswitches it to a small LWE key (dimension 918), and one
//! programmable bootstrap (PBS) with a lookup table per output channel maps the accumulator's
//! top bits to the next layer's input code — requantisation, activation and quantisation in one
//! table — as a fresh LWE under the input GLWE key again, ready for the next linear layer.
//!
//! # Parameters
//!
//! Everything that sets the security level is tfhe's published
//! `V1_8_PARAM_MESSAGE_2_CARRY_2_KS_PBS_TUNIFORM_2M128` (128-bit, an alias of the `V1_4` set):
//! small LWE `n = 918` with `TUniform(45)` noise, GLWE `k = 1, N = 2048` with `TUniform(17)` (the
//! input key of this crate, [`INPUT_GLWE`]), keyswitch base `2^4`, 4 levels. Only the bootstrap's
//! gadget decomposition differs: base `2^16` with 2 levels instead of base `2^23` with 1 level.
//! Decomposition parameters change the noise and the cost, never the hardness of the keys (the
//! LWE/GLWE dimensions and noise distributions are the set's), and the set's own base leaves
//! `σ ≈ 2^48.8` on a bootstrap's output — too much for the next linear layer, whose weights
//! multiply it by up to `‖w‖ ≈ 2^10`. With 2 levels it is `σ ≈ 2^42.3` (3 levels of `2^12` would
//! give `2^39` for half again the cost; the module's output keeps enough exact top bits either way).
//!
//! # Noise and failure probability (variances on the 64-bit torus, `q = 2^64`)
//!
//! | step | variance |
//! |---|---|
//! | keyswitch, key noise | `n_in · L_ks · (B_ks² + 2)/12 · V(TUniform(45))` |
//! | keyswitch, decomposition rounding | `n_in/2 · 2^(2(64 − B_ks·L_ks))/12` |
//! | modulus switch to `2N` | `(n/2 + 1) · (q/2N)²/12` |
//! | bootstrap output | `n · [L·(k+1)·N·(B² + 2)/12 · V(TUniform(17)) + (1 + kN/2) · 2^(2(64 − B·L))/12]` |
//!
//! plus the incoming accumulator's own noise (tiny next to the modulus switch). A bootstrap reads
//! `p` rounded bits plus a padding bit: one rounding step is `W = 2^(63 − p)` on the torus.
//! Its result differs from round-to-nearest of the clear accumulator when the accumulator lies
//! within the noise of a rounding boundary (*approximate rounding*, as Concrete ML's default):
//! then it is the other neighbour, one step away. It is off by **two** or more steps only if
//! `|e| > W`: that is the failure probability this module states ([`failure_log2`]) and
//! `tests/integration/pbs.rs` measures. With `p = 5`, `σ ≈ 2^54.8` and `W = 2^58`, about
//! `2^-64` per bootstrap.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::*;

use super::codec::{CodecError, Wire};
use super::params::{tuniform_variance, INPUT_GLWE};
use super::FheError;

/// Parameters of the keyswitch and bootstrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PbsParams {
    pub lwe_dimension: usize,
    pub lwe_noise_bound_log2: u32,
    pub ks_base_log: u32,
    pub ks_level: usize,
    pub pbs_base_log: u32,
    pub pbs_level: usize,
}

/// See the module documentation for where each number comes from.
pub const PBS_PARAMS: PbsParams = PbsParams {
    lwe_dimension: 918,
    lwe_noise_bound_log2: 45,
    ks_base_log: 4,
    ks_level: 4,
    pbs_base_log: 16,
    pbs_level: 2,
};

/// Rounded accumulator bits a bootstrap may read (the padding bit comes on top).
pub const MAX_ROUNDING_BITS: u32 = 6;
pub const DEFAULT_ROUNDING_BITS: u32 = 5;

/// Coefficients of an LWE ciphertext under the input key (mask then body).
pub const BIG_LWE_LEN: usize = INPUT_GLWE.glwe_dimension * INPUT_GLWE.polynomial_size + 1;

fn n_big() -> usize {
    INPUT_GLWE.lwe_dimension()
}

/// Variance of the keyswitch (both terms) for an input of dimension `n_in`.
pub fn keyswitch_variance(p: &PbsParams) -> f64 {
    let n_in = n_big() as f64;
    let b = 2f64.powi(p.ks_base_log as i32);
    let key =
        n_in * p.ks_level as f64 * (b * b + 2.0) / 12.0 * tuniform_variance(p.lwe_noise_bound_log2);
    let kept = p.ks_base_log as i32 * p.ks_level as i32;
    let rounding = n_in / 2.0 * 2f64.powi(2 * (64 - kept)) / 12.0;
    key + rounding
}

/// Variance of the modulus switch to `2N` before the blind rotation.
pub fn modulus_switch_variance(p: &PbsParams) -> f64 {
    let step = 2f64.powi(64) / (2 * INPUT_GLWE.polynomial_size) as f64;
    (p.lwe_dimension as f64 / 2.0 + 1.0) * step * step / 12.0
}

/// Variance of a bootstrap's output (the next layer's input noise).
pub fn bootstrap_output_variance(p: &PbsParams) -> f64 {
    let (k, n) = (
        INPUT_GLWE.glwe_dimension as f64,
        INPUT_GLWE.polynomial_size as f64,
    );
    let b = 2f64.powi(p.pbs_base_log as i32);
    let key = p.pbs_level as f64 * (k + 1.0) * n * (b * b + 2.0) / 12.0
        * tuniform_variance(INPUT_GLWE.noise_bound_log2);
    let kept = p.pbs_base_log as i32 * p.pbs_level as i32;
    let rounding = (1.0 + k * n / 2.0) * 2f64.powi(2 * (64 - kept)) / 12.0;
    p.lwe_dimension as f64 * (key + rounding)
}

/// Standard deviation of the phase a bootstrap reads, for an incoming accumulator of variance
/// `input_variance`.
pub fn bootstrap_input_std(p: &PbsParams, input_variance: f64) -> f64 {
    (input_variance + keyswitch_variance(p) + modulus_switch_variance(p)).sqrt()
}

/// `log2` of the probability that one bootstrap reading `bits` rounded bits lands two or more
/// rounding steps away from round-to-nearest (a Gaussian tail beyond one step `W`).
pub fn failure_log2(bits: u32, std: f64) -> f64 {
    let w = 2f64.powi(63 - bits as i32);
    gaussian_two_sided_tail_log2(w / std)
}

/// Expected fraction of bootstraps whose result is the neighbour of round-to-nearest (the
/// accumulator uniform within a step): `E|e| / W = σ·√(2/π) / W`, capped at 1.
pub fn neighbour_rate(bits: u32, std: f64) -> f64 {
    let w = 2f64.powi(63 - bits as i32);
    (std * (2.0 / std::f64::consts::PI).sqrt() / w).min(1.0)
}

/// `log2 P(|N(0,1)| > z)`, from the asymptotic expansion of `erfc` (accurate to a few percent for
/// `z ≥ 3`, exact enough for a bound stated in powers of two; 0 below).
fn gaussian_two_sided_tail_log2(z: f64) -> f64 {
    if z < 3.0 {
        // A parameter choice far outside what compile accepts: state only the trivial bound.
        return 0.0;
    }
    let tail = (2.0 / std::f64::consts::PI).sqrt() / z
        * (-z * z / 2.0).exp()
        * (1.0 - 1.0 / (z * z) + 3.0 / z.powi(4));
    if tail > 0.0 {
        tail.log2()
    } else {
        // exp underflows below 2^-1074: use logarithms throughout.
        ((2.0 / std::f64::consts::PI).sqrt() / z).log2() - z * z / 2.0 * std::f64::consts::LOG2_E
    }
}

/// The bootstrapping keys as uploaded: a seeded keyswitch key (input key → small key) and a
/// seeded bootstrap key (small key bits as GGSWs under the input key), bodies only.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BootstrapKey {
    pub params: PbsParams,
    pub ks_seed: u128,
    /// Little-endian `u64` bodies, `n_in × ks_level`.
    #[serde(with = "serde_bytes")]
    pub ks_bodies: Vec<u8>,
    pub bsk_seed: u128,
    /// Little-endian `u64` bodies, `n × pbs_level × (k+1) × N`.
    #[serde(with = "serde_bytes")]
    pub bsk_bodies: Vec<u8>,
}

impl BootstrapKey {
    fn ks_len(p: &PbsParams) -> usize {
        n_big() * p.ks_level
    }

    fn bsk_len(p: &PbsParams) -> usize {
        p.lwe_dimension * p.pbs_level * (INPUT_GLWE.glwe_dimension + 1) * INPUT_GLWE.polynomial_size
    }

    /// Exact payload size of a bootstrapping key of this build.
    pub fn expected_len() -> usize {
        32 + 8 * (Self::ks_len(&PBS_PARAMS) + Self::bsk_len(&PBS_PARAMS))
    }

    pub fn wire_len(&self) -> usize {
        32 + self.ks_bodies.len() + self.bsk_bodies.len()
    }

    /// Check shapes against this build's parameters (a decoded key is checked with this).
    pub fn check(&self) -> Result<(), String> {
        if self.params != PBS_PARAMS {
            return Err(format!(
                "bootstrap parameters {:?} differ from this build's {:?}",
                self.params, PBS_PARAMS
            ));
        }
        let (ks, bsk) = (
            Self::ks_len(&self.params) * 8,
            Self::bsk_len(&self.params) * 8,
        );
        if self.ks_bodies.len() != ks || self.bsk_bodies.len() != bsk {
            return Err(format!(
                "expected {ks} keyswitch and {bsk} bootstrap body bytes, got {} and {}",
                self.ks_bodies.len(),
                self.bsk_bodies.len()
            ));
        }
        Ok(())
    }
}

impl Wire for BootstrapKey {
    const KIND: u8 = 9;
    const NAME: &'static str = "bootstrap key";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        self.check().map_err(CodecError::invalid::<Self>)
    }
}

fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn from_bytes(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// The client's small LWE key and the bootstrapping keys made from it.
pub(crate) fn generate_bootstrap_key(
    glwe_key: &GlweSecretKeyOwned<u64>,
    small_key: &LweSecretKeyOwned<u64>,
) -> BootstrapKey {
    let p = PBS_PARAMS;
    let mut seeder = new_seeder();
    // Mask seeds chosen here (and sent), noise from the OS-seeded generator.
    let (ks_seed, bsk_seed) = (seeder.seed(), seeder.seed());
    let mut ksk = SeededLweKeyswitchKeyOwned::new(
        0u64,
        DecompositionBaseLog(p.ks_base_log as usize),
        DecompositionLevelCount(p.ks_level),
        LweDimension(n_big()),
        LweDimension(p.lwe_dimension),
        CompressionSeed::from(ks_seed),
        CiphertextModulus::new_native(),
    );
    generate_seeded_lwe_keyswitch_key(
        &glwe_key.as_lwe_secret_key(),
        small_key,
        &mut ksk,
        DynamicDistribution::new_t_uniform(p.lwe_noise_bound_log2),
        seeder.as_mut(),
    );
    let mut bsk = SeededLweBootstrapKeyOwned::new(
        0u64,
        GlweSize(INPUT_GLWE.glwe_dimension + 1),
        PolynomialSize(INPUT_GLWE.polynomial_size),
        DecompositionBaseLog(p.pbs_base_log as usize),
        DecompositionLevelCount(p.pbs_level),
        LweDimension(p.lwe_dimension),
        CompressionSeed::from(bsk_seed),
        CiphertextModulus::new_native(),
    );
    par_generate_seeded_lwe_bootstrap_key(
        small_key,
        glwe_key,
        &mut bsk,
        DynamicDistribution::new_t_uniform(INPUT_GLWE.noise_bound_log2),
        seeder.as_mut(),
    );
    BootstrapKey {
        params: p,
        ks_seed: ks_seed.0,
        ks_bodies: to_bytes(ksk.as_ref()),
        bsk_seed: bsk_seed.0,
        bsk_bodies: to_bytes(bsk.as_ref()),
    }
}

/// A fresh small LWE key.
pub(crate) fn generate_small_key() -> LweSecretKeyOwned<u64> {
    let mut seeder = new_seeder();
    let mut generator = SecretRandomGenerator::<DefaultRandomGenerator>::new(seeder.seed());
    allocate_and_generate_new_binary_lwe_secret_key(
        LweDimension(PBS_PARAMS.lwe_dimension),
        &mut generator,
    )
}

/// The server's form of a [`BootstrapKey`]: the keyswitch key with its masks regenerated and the
/// bootstrap key in the Fourier domain.
pub struct FourierBootstrapKey {
    ksk: LweKeyswitchKeyOwned<u64>,
    bsk: FourierLweBootstrapKeyOwned,
    fft: Fft,
}

impl FourierBootstrapKey {
    /// Decompress and transform (parallel, on the current rayon pool).
    pub fn new(key: &BootstrapKey) -> Result<Self, FheError> {
        key.check().map_err(FheError::ParameterMismatch)?;
        let p = key.params;
        let glwe_size = GlweSize(INPUT_GLWE.glwe_dimension + 1);
        let poly = PolynomialSize(INPUT_GLWE.polynomial_size);
        let seeded_ksk = SeededLweKeyswitchKey::from_container(
            from_bytes(&key.ks_bodies),
            DecompositionBaseLog(p.ks_base_log as usize),
            DecompositionLevelCount(p.ks_level),
            LweSize(p.lwe_dimension + 1),
            CompressionSeed::from(Seed(key.ks_seed)),
            CiphertextModulus::new_native(),
        );
        let seeded_bsk = SeededLweBootstrapKey::from_container(
            from_bytes(&key.bsk_bodies),
            glwe_size,
            poly,
            DecompositionBaseLog(p.pbs_base_log as usize),
            DecompositionLevelCount(p.pbs_level),
            CompressionSeed::from(Seed(key.bsk_seed)),
            CiphertextModulus::new_native(),
        );
        let ksk = seeded_ksk.decompress_into_lwe_keyswitch_key();
        let standard = seeded_bsk.par_decompress_into_lwe_bootstrap_key();
        let mut bsk = FourierLweBootstrapKey::new(
            standard.input_lwe_dimension(),
            glwe_size,
            poly,
            standard.decomposition_base_log(),
            standard.decomposition_level_count(),
        );
        par_convert_standard_lwe_bootstrap_key_to_fourier(&standard, &mut bsk);
        Ok(Self {
            ksk,
            bsk,
            fft: Fft::new(poly),
        })
    }

    /// Bytes held in memory (what a worker's key cache accounts for).
    pub fn size_bytes(&self) -> usize {
        self.ksk.as_ref().len() * 8 + self.bsk.as_view().data().len() * 16
    }

    /// Bootstrap every LWE of `lwes` (`BIG_LWE_LEN` coefficients each, under the input key) in
    /// place: add `offset` to its body, keyswitch, and blind-rotate `luts[table(i)]`.
    pub fn bootstrap_all(
        &self,
        lwes: &mut [u64],
        offset: u64,
        luts: &[GlweCiphertextOwned<u64>],
        table: impl Fn(usize) -> usize + Sync,
    ) {
        let fft = self.fft.as_view();
        let requirement = programmable_bootstrap_lwe_ciphertext_mem_optimized_requirement::<u64>(
            self.bsk.glwe_size(),
            self.bsk.polynomial_size(),
            fft,
        )
        .unaligned_bytes_required();
        let small = LweSize(PBS_PARAMS.lwe_dimension + 1);
        lwes.par_chunks_mut(BIG_LWE_LEN).enumerate().for_each_init(
            || {
                let mut buffers = ComputationBuffers::new();
                buffers.resize(requirement);
                (
                    buffers,
                    LweCiphertext::new(0u64, small, CiphertextModulus::new_native()),
                )
            },
            |(buffers, small_ct), (i, lwe)| {
                lwe[BIG_LWE_LEN - 1] = lwe[BIG_LWE_LEN - 1].wrapping_add(offset);
                let input = LweCiphertext::from_container(&*lwe, CiphertextModulus::new_native());
                keyswitch_lwe_ciphertext(&self.ksk, &input, small_ct);
                let mut output =
                    LweCiphertext::from_container(&mut *lwe, CiphertextModulus::new_native());
                programmable_bootstrap_lwe_ciphertext_mem_optimized(
                    small_ct,
                    &mut output,
                    &luts[table(i)],
                    &self.bsk,
                    fft,
                    buffers.stack(),
                );
            },
        );
    }
}

/// The lookup table of one output channel: entry `i` (`0 ≤ i < 2^bits`) is the torus value the
/// bootstrap returns for rounded input `i`; inputs past the window wrap negacyclically (entry
/// `i + 2^bits` returns `−table[i]`).
pub fn lookup_table(bits: u32, values: &[u64]) -> GlweCiphertextOwned<u64> {
    debug_assert_eq!(values.len(), 1 << bits);
    generate_programmable_bootstrap_glwe_lut(
        PolynomialSize(INPUT_GLWE.polynomial_size),
        GlweSize(INPUT_GLWE.glwe_dimension + 1),
        1 << bits,
        CiphertextModulus::new_native(),
        1u64,
        |i| values[i as usize],
    )
}

/// The phase offset that moves a signed window `[−2^(bits−1), 2^(bits−1))` of steps into the
/// bootstrap's `[0, 2^bits)`: a quarter of the torus.
pub const WINDOW_OFFSET: u64 = 1 << 62;
