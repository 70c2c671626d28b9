//! The one place seeded GLWE lists are expanded: a request's or a key's masks are regenerated
//! from its 16-byte seed exactly as the client's encryption drew them.

use tfhe::core_crypto::commons::math::random::{CompressionSeed, Seed};
use tfhe::core_crypto::prelude::{
    decompress_seeded_glwe_ciphertext_list, CiphertextModulus, DefaultRandomGenerator,
    GlweCiphertextCount, GlweCiphertextList, GlweSize, PolynomialSize, SeededGlweCiphertextList,
};

/// The `bodies.len() / n` GLWEs of dimension `k` seeded by `seed`, with `bodies` as their bodies
/// (zeros when only the masks are wanted): `(k+1)·n` coefficients each, masks first.
pub(super) fn decompress(bodies: Vec<u64>, seed: u128, k: usize, n: usize) -> Vec<u64> {
    let count = bodies.len() / n;
    let seeded = SeededGlweCiphertextList::from_container(
        bodies,
        GlweSize(k + 1),
        PolynomialSize(n),
        CompressionSeed::from(Seed(seed)),
        CiphertextModulus::new_native(),
    );
    let mut glwes = GlweCiphertextList::new(
        0u64,
        GlweSize(k + 1),
        PolynomialSize(n),
        GlweCiphertextCount(count),
        CiphertextModulus::new_native(),
    );
    decompress_seeded_glwe_ciphertext_list::<_, _, _, DefaultRandomGenerator>(&mut glwes, &seeded);
    glwes.into_container()
}
