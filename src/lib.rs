//! hyfhe: hybrid neural networks whose private layers run on encrypted activations (TFHE/GLWE).
//!
//! # Layout
//!
//! - [`quant`]: quantizers (weights per tensor / per channel, inputs static / dynamic per row) and
//!   the clear integer simulation every encrypted result is checked against.
//! - [`fhe`]: the only module that touches `tfhe`: parameters and noise budget, keys, the encrypted
//!   linear-layer engine (GLWE products + Fourier-domain packing keyswitch) and wire codecs.
//! - [`bench`]: the `hyfhe bench linear` measurement (encrypted vs. plaintext, same process).

pub mod bench;
pub mod client;
pub mod commands;
pub mod config;
pub mod coordinator;
pub mod demo;
pub mod fhe;
pub mod hybrid;
pub mod model;
pub mod progress;
pub mod protocol;
pub mod quant;
pub mod queue;
pub mod service;
pub mod telemetry;
pub mod worker;
