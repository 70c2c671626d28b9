//! Wire types shared by client, coordinator and worker, and the one table of error codes.
//!
//! Heavy bodies are MessagePack (`Content-Type: application/msgpack`): opening a session, and
//! compute requests and responses, whose bodies are the `fhe` envelopes of `EncryptedRows` and
//! `EncryptedOutputs` as they are (the coordinator validates them, it never re-encodes them).
//! Small metadata and errors are JSON, readable with `curl`.

mod error;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::fhe::{EncryptedRows, LayerPlan, Precision};

pub use error::{ErrorBody, ErrorCode};

pub const MSGPACK: &str = "application/msgpack";
/// Header carrying the session token on compute and delete requests.
pub const SESSION_TOKEN_HEADER: &str = "x-hyfhe-session-token";
/// Header carrying the client-chosen job id: a retry with the same id gets the same result.
pub const JOB_ID_HEADER: &str = "idempotency-key";
/// Header of the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";
/// Largest encoded rows or outputs blob a service decodes.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;
/// Longest job id accepted.
pub const MAX_JOB_ID_LEN: usize = 64;

/// `GET /v1/models`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
    /// Largest `rows × outputs` one compute request may carry (else 413): clients split by it.
    pub max_job_values: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub modules: Vec<ModuleInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    pub precision: Precision,
    /// SHA-256 of the encoded client spec: a client refuses a server that compiled differently.
    pub client_spec_sha256: String,
    /// Rows one compute request may carry, when the module sets its own limit (a non-linear
    /// module holds every hidden value of a request in its workers' job budget); clients split
    /// by the smaller of this and `max_job_values / outputs`. Absent from older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rows: Option<u32>,
}

/// `GET /v1/models/{model}/client`: the client tree, file by file (manifest included), so the
/// receiver verifies it with the same code that reads it from disk.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientBundle {
    pub model: String,
    pub files: BTreeMap<String, ByteBuf>,
}

impl ClientBundle {
    /// A relative path made of plain components: nothing a malicious server could use to write
    /// outside the directory the bundle is unpacked into.
    pub fn is_safe_path(path: &str) -> bool {
        !path.is_empty()
            && path.len() <= 512
            && path.split('/').all(|c| {
                !c.is_empty()
                    && c != "."
                    && c != ".."
                    && c.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
            })
    }
}

/// `POST /v1/sessions` (msgpack).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateSession {
    pub model: String,
    /// One encoded `EvaluationKey` per precision the model's modules use.
    pub keys: Vec<ByteBuf>,
}

/// Answer to `POST /v1/sessions` (JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionCreated {
    pub session_id: String,
    pub token: String,
    pub expires_unix_ms: u64,
    pub ttl_s: u64,
}

/// Checks a request's rows against the module's plan: what the coordinator refuses with 400
/// before anything is queued.
pub fn check_rows(module: &str, plan: &LayerPlan, rows: &EncryptedRows) -> Result<(), String> {
    if rows.in_features as usize != plan.in_features {
        return Err(format!(
            "module `{module}` takes rows of {} features, the request has {}",
            plan.in_features, rows.in_features
        ));
    }
    if rows.body_bits as u32 != plan.input_body_bits {
        return Err(format!(
            "module `{module}` expects {}-bit ciphertext bodies, the request has {}",
            plan.input_body_bits, rows.body_bits
        ));
    }
    Ok(())
}

/// A job id as a client may choose it.
pub fn is_valid_job_id(id: &str) -> bool {
    (8..=MAX_JOB_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_paths_cannot_escape() {
        assert!(ClientBundle::is_safe_path("modules/seq.0.spec"));
        assert!(ClientBundle::is_safe_path("manifest.json"));
        for bad in [
            "",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "a\\b",
            "./a",
        ] {
            assert!(!ClientBundle::is_safe_path(bad), "{bad}");
        }
        assert!(is_valid_job_id("0f8e7d6c-aaaa"));
        assert!(!is_valid_job_id("short"));
        assert!(!is_valid_job_id("with space in it"));
    }
}
