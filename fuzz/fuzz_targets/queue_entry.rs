//! What a worker reads back from the queue and the outcome store: a job entry and its payload,
//! and a stored outcome with the outputs in it. A corrupt entry must be refused, never panic a
//! worker.
#![no_main]

#[path = "common.rs"]
mod common;

use hyfhe::fhe::{decode, EncryptedOutputs, EncryptedRows};
use hyfhe::queue::{Job, JobOutcome, StoredOutcome};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(job) = rmp_serde::from_slice::<Job>(data) {
        let _ = hyfhe::protocol::is_valid_job_id(&job.client_job_id);
        let _ = decode::<EncryptedRows>(&job.payload, job.payload.len());
    }
    if let Ok(stored) = rmp_serde::from_slice::<StoredOutcome>(data) {
        if let JobOutcome::Done(bytes) = stored.outcome {
            let _ = decode::<EncryptedOutputs>(&bytes, bytes.len());
        }
    }
    let _ = common::decode_both::<EncryptedRows>(data);
});
