//! What a compiled remote module is, on each side of the wire.
//!
//! [`ClientSpec`] is everything a client needs to quantize, encrypt, decrypt and dequantize for
//! one module: shapes, the input quantizer, the crypto plan and the per-channel dequantizer. It
//! holds no weight matrix. [`ServerModule`] is what a worker loads: the quantized weights and the
//! plan, plus the hash of the client spec it was compiled with so mismatched trees are refused.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::fhe::{ChainProgram, CodecError, LayerPlan, Wire};
use crate::model::LinearKind;
use crate::quant::{InputQuantization, OutputDequantizer, QuantizedWeights};

/// Version of the client/server protocol a spec was compiled for.
pub const PROTOCOL_VERSION: u16 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientSpec {
    pub protocol_version: u16,
    pub module: String,
    pub kind: LinearKind,
    pub in_features: usize,
    pub out_features: usize,
    pub input: InputQuantization,
    pub plan: LayerPlan,
    pub dequantizer: OutputDequantizer,
    /// How a non-linear module's result is decoded (`plan` then only describes its input).
    #[serde(default)]
    pub output_plan: Option<LayerPlan>,
    /// A non-linear module's widest stage, in values: with the workers' job budget it sets the
    /// rows one request may carry ([`crate::fhe::chain_rows_within`]), which the server
    /// publishes. Absent from older artefacts (and encoded only when present, so their digests
    /// stay what they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_width: Option<usize>,
    /// `[height, width]` of the map a module with a convolution after its first layer was
    /// compiled for (its server gathers each pixel's neighbours within that map): inputs must
    /// give maps of this size, and requests carry whole maps. Encoded only when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<[usize; 2]>,
    /// For a backward module (compiled only when the owner opts a model into training): the
    /// forward module whose weights it holds transposed, so that it answers the input gradient
    /// `g·W`. Its rows count against that module's row budget, since both reveal the same `W`.
    /// Encoded only when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backward_of: Option<String>,
}

impl ClientSpec {
    /// Pixels per map of a convolving module (requests carry multiples of it).
    pub fn map_pixels(&self) -> Option<usize> {
        self.map.map(|[h, w]| h * w)
    }

    /// A forward dense product with no activations: the only kind a backward module transposes.
    pub fn is_plain_dense(&self) -> bool {
        self.backward_of.is_none()
            && self.output_plan.is_none()
            && matches!(self.kind, LinearKind::Dense)
    }
}

impl Wire for ClientSpec {
    const KIND: u8 = 4;
    const NAME: &'static str = "client spec";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        let bad = |r: String| Err(CodecError::invalid::<Self>(r));
        check_protocol::<Self>(self.protocol_version)?;
        if self.plan.in_features != self.in_features
            || (self.output_plan.is_none() && self.plan.out_features != self.out_features)
        {
            return bad(format!(
                "plan is {}×{}, module {}×{}",
                self.plan.out_features, self.plan.in_features, self.out_features, self.in_features
            ));
        }
        if let crate::model::LinearKind::Conv(g) = self.kind {
            if g.features() != self.in_features || g.stride.contains(&0) || g.dilation.contains(&0)
            {
                return bad(format!(
                    "conv geometry {g:?} for {} features",
                    self.in_features
                ));
            }
        }
        if self.map.is_some_and(|[h, w]| h == 0 || w == 0) {
            return bad("an empty convolution map".into());
        }
        if self.input.bits() != self.plan.input_bits {
            return bad("input quantizer and plan disagree on bits".into());
        }
        self.plan.check_auto().or_else(bad)?;
        let output = self.output_plan.as_ref().unwrap_or(&self.plan);
        if output.out_features != self.out_features {
            return bad(format!(
                "output plan has {} values, the module {}",
                output.out_features, self.out_features
            ));
        }
        if self.dequantizer.out_features != self.out_features {
            return bad("dequantizer width differs from the module's".into());
        }
        self.dequantizer.check().or_else(|e| bad(e.to_string()))
    }
}

impl ClientSpec {
    /// Content hash of the encoded spec (what a server module and the registry refer to).
    pub fn sha256(&self) -> String {
        sha256_hex(&crate::fhe::encode(self))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerModule {
    pub protocol_version: u16,
    pub module: String,
    pub plan: LayerPlan,
    pub weights: QuantizedWeights,
    /// [`ClientSpec::sha256`] of the spec compiled alongside.
    pub client_spec_sha256: String,
    /// The stages after the first layer of a non-linear module.
    #[serde(default)]
    pub chain: Option<ChainProgram>,
}

impl Wire for ServerModule {
    const KIND: u8 = 5;
    const NAME: &'static str = "server module";
    const VERSION: u16 = 1;

    fn validate(&self) -> Result<(), CodecError> {
        let bad = |r: String| Err(CodecError::invalid::<Self>(r));
        check_protocol::<Self>(self.protocol_version)?;
        self.plan.check_auto().or_else(bad)?;
        let w = &self.weights;
        if w.in_features != self.plan.in_features
            || w.out_features != self.plan.out_features
            || w.codes.len() != w.in_features * w.out_features
            || w.bits != self.plan.weight_bits
        {
            return bad(format!(
                "weights {}×{} ({} codes, {} bits) vs plan {}×{} ({} bits)",
                w.out_features,
                w.in_features,
                w.codes.len(),
                w.bits,
                self.plan.out_features,
                self.plan.in_features,
                self.plan.weight_bits
            ));
        }
        if let Some(chain) = &self.chain {
            chain.check(&self.plan).or_else(bad)?;
        }
        Ok(())
    }
}

fn check_protocol<T: Wire>(version: u16) -> Result<(), CodecError> {
    if version == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(CodecError::invalid::<T>(format!(
            "protocol version {version} (this build speaks {PROTOCOL_VERSION})"
        )))
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
