//! Versioned, size-limited envelopes for everything that crosses a process boundary.
//!
//! Layout: `b"HYFHE"`, one kind byte, a little-endian `u16` version, then the MessagePack
//! (`rmp-serde`) body. Decoding checks the total size against the caller's limit *before*
//! parsing, so a hostile length prefix cannot make us allocate more than the bytes we were given;
//! after parsing, [`Wire::validate`] checks shapes and parameters before any large derived
//! allocation happens.

use serde::{de::DeserializeOwned, Serialize};

const MAGIC: &[u8; 5] = b"HYFHE";
const HEADER_LEN: usize = MAGIC.len() + 1 + 2;

/// A type that travels between processes.
pub trait Wire: Serialize + DeserializeOwned {
    /// Stable one-byte tag, so a key is never decoded as a ciphertext.
    const KIND: u8;
    const NAME: &'static str;
    /// The version this build writes.
    const VERSION: u16;
    /// The oldest version this build still reads (every one up to [`Wire::VERSION`]).
    const OLDEST_VERSION: u16 = Self::VERSION;
    /// Shape and parameter conformance; runs right after parsing.
    fn validate(&self) -> Result<(), CodecError>;
    /// What an older readable version (`OLDEST_VERSION..VERSION`) may not carry; runs before
    /// [`Wire::validate`], so its reason names the version.
    fn check_version(&self, _version: u16) -> Result<(), CodecError> {
        Ok(())
    }
}

/// Why a blob was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CodecError {
    #[error("{name} blob of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        name: &'static str,
        size: usize,
        limit: usize,
    },
    #[error("not a hyfhe blob (bad magic or shorter than its header); expected a {expected}")]
    BadMagic { expected: &'static str },
    #[error("expected a {expected} blob, got kind {found}")]
    WrongKind { expected: &'static str, found: u8 },
    #[error("{name} version {found} is not supported (this build reads versions {oldest} to {supported})")]
    UnsupportedVersion {
        name: &'static str,
        found: u16,
        oldest: u16,
        supported: u16,
    },
    #[error("malformed {name}: {reason}")]
    Malformed { name: &'static str, reason: String },
    #[error("invalid {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl CodecError {
    pub fn invalid<T: Wire>(reason: impl Into<String>) -> Self {
        Self::Invalid {
            name: T::NAME,
            reason: reason.into(),
        }
    }
}

pub fn encode<T: Wire>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(MAGIC);
    out.push(T::KIND);
    out.extend_from_slice(&T::VERSION.to_le_bytes());
    // Writing into a Vec cannot fail and our types have no maps with non-string keys.
    rmp_serde::encode::write_named(&mut out, value).expect("msgpack encoding into a Vec");
    out
}

pub fn decode<T: Wire>(bytes: &[u8], limit: usize) -> Result<T, CodecError> {
    if bytes.len() > limit {
        return Err(CodecError::TooLarge {
            name: T::NAME,
            size: bytes.len(),
            limit,
        });
    }
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(CodecError::BadMagic { expected: T::NAME });
    }
    let kind = bytes[MAGIC.len()];
    if kind != T::KIND {
        return Err(CodecError::WrongKind {
            expected: T::NAME,
            found: kind,
        });
    }
    let version = u16::from_le_bytes([bytes[MAGIC.len() + 1], bytes[MAGIC.len() + 2]]);
    if !(T::OLDEST_VERSION..=T::VERSION).contains(&version) {
        return Err(CodecError::UnsupportedVersion {
            name: T::NAME,
            found: version,
            oldest: T::OLDEST_VERSION,
            supported: T::VERSION,
        });
    }
    let value: T =
        rmp_serde::from_slice(&bytes[HEADER_LEN..]).map_err(|e| CodecError::Malformed {
            name: T::NAME,
            reason: e.to_string(),
        })?;
    value.check_version(version)?;
    value.validate()?;
    Ok(value)
}
