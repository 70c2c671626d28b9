//! hyfhe: hybrid neural networks whose private layers run on encrypted activations (TFHE/GLWE).
//!
//! # Layout
//!
//! - [`quant`]: quantizers (weights per tensor / per channel, inputs static / dynamic per row) and
//!   the clear integer simulation every encrypted result is checked against.
//! - [`fhe`]: the only module that touches `tfhe`: parameters and noise budget, keys, the encrypted
//!   linear-layer engine (GLWE products + Fourier-domain packing keyswitch) and wire codecs.
//! - [`model`]: ONNX import, PyTorch module paths, graph cutting, tract execution.
//! - [`hybrid`]: `HybridModel`: compile, modes, save/clear private info, artefact trees.
//! - [`protocol`]: wire types shared by client, coordinator and worker; error codes.
//! - [`queue`]: the `JobQueue` trait; Redis Streams and in-memory implementations.
//! - [`coordinator`]: the HTTP API (actix-web routes) and its actors.
//! - [`worker`]: actors that read jobs, hold keys and modules, and evaluate.
//! - [`client`]: sessions and remote calls (`hybrid::Remote` over HTTP).
//! - [`config`], [`service`], [`telemetry`]: configuration, service assembly, logs/traces/metrics.
//! - [`tls`]: HTTPS for the client and the coordinator's own TLS listener (rustls).
//! - [`commands`], [`bench`], [`demo`], [`progress`]: what the CLI runs.

#[cfg(feature = "server")]
pub mod bench;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod commands;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod coordinator;
#[cfg(feature = "server")]
pub mod demo;
pub mod fhe;
pub mod hybrid;
pub mod model;
pub mod progress;
pub mod protocol;
pub mod quant;
#[cfg(feature = "server")]
pub mod queue;
#[cfg(feature = "server")]
pub mod service;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "client")]
pub mod tls;
#[cfg(feature = "server")]
pub mod worker;
