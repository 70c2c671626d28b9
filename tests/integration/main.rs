//! Integration tests of the encrypted engine (one binary; modules by subject).

mod automorph;
mod cli;
mod cluster;
mod codecs;
mod compose;
mod config;
mod encodings;
mod exactness;
mod fronts;
mod ha;
mod hardening;
mod helpers;
mod hybrid;
mod isolation;
mod k8s;
mod llm;
mod noise;
mod pbs;
mod qat;
mod queue;
mod resnet;
mod serving;
mod telemetry;
mod tls;
mod worker;
mod zoo;
