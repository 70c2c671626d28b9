//! Criterion benches of the encrypted linear-layer kernels, each beside its plaintext baseline of
//! the same shape, so that ratios are taken within one run on a noisy machine.
//!
//! `cargo bench --bench linear`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hyfhe::fhe::{ClientKey, FourierLinearLayer, LayerPlan, Precision, SessionKey};
use ndarray::Array2;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn linear(c: &mut Criterion) {
    let client = ClientKey::generate();
    let eval_key = client.evaluation_key(Precision::Exact, &|_| ());
    let server_key = SessionKey::new(&eval_key);
    let mut group = c.benchmark_group("linear_2048x2048");
    group.sample_size(10);
    for rows in [1usize, 4] {
        let (cols, out) = (2048, 2048);
        let mut rng = StdRng::seed_from_u64(1);
        let codes: Vec<i8> = (0..out * cols).map(|_| rng.gen_range(-128..=127)).collect();
        let values: Vec<i32> = (0..rows * cols)
            .map(|_| rng.gen_range(-255..=255))
            .collect();
        let plan = LayerPlan::new("bench", Precision::Exact, cols, out, 8, 8).unwrap();
        let layer = FourierLinearLayer::new(plan.clone(), &codes).unwrap();
        let request = client.encrypt_rows(&plan, &values, rows).unwrap();
        group.bench_with_input(BenchmarkId::new("encrypted_eval", rows), &rows, |b, _| {
            b.iter(|| layer.evaluate(&server_key, &request).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("encrypt", rows), &rows, |b, &rows| {
            b.iter(|| client.encrypt_rows(&plan, &values, rows).unwrap())
        });
        let x = Array2::from_shape_fn((rows, cols), |(r, i)| values[r * cols + i] as f32);
        let w = Array2::from_shape_fn((cols, out), |(i, j)| codes[j * cols + i] as f32);
        group.bench_with_input(
            BenchmarkId::new("plaintext_f32_dot", rows),
            &rows,
            |b, _| b.iter(|| x.dot(&w)),
        );
    }
    group.finish();
}

criterion_group!(benches, linear);
criterion_main!(benches);
