//! Language models: which graph inputs and outputs play which role, feeding them, and greedy
//! generation with or without a KV cache.
//!
//! Roles are recognised by the names Optimum and `tests/fixtures/make_torch_fixtures.py` give
//! them: `input_ids` (int64 `[batch, seq]`), optional `attention_mask` (`[batch, past + seq]`)
//! and `position_ids` (`[batch, seq]`), `past_key_values.*` inputs matched in graph order with
//! `present.*` outputs (`[batch, heads, past, head_dim]`), and `logits` (`[batch, seq, vocab]`).
//! With a cache, every step after the prompt feeds one new token and the previous step's
//! presents, so each remote module sees **one row** per generated token; without one the whole
//! sequence is re-run.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use tract_onnx::pb::{tensor_shape_proto::dimension, type_proto, GraphProto};
use tract_onnx::prelude::{DatumType, Tensor};

use super::runtime::{ForwardStats, ModuleBackend, Runtime};
use super::HybridError;
use crate::model::{ModelError, Value};

/// Which runtime input / output index plays which role.
#[derive(Clone, Debug)]
pub struct LmSignature {
    pub ids: usize,
    /// The declared element type of `input_ids` (int64 unless the export says int32).
    pub ids_type: DatumType,
    pub mask: Option<(usize, DatumType)>,
    pub positions: Option<usize>,
    /// Past inputs with their declared shapes (`None` for a symbolic axis) and the past axis.
    pub past: Vec<(usize, Vec<Option<usize>>, usize)>,
    pub logits: usize,
    pub present: Vec<usize>,
    /// The vocabulary size: the rows of the embedding table the ids index (else what the
    /// logits output declares).
    pub vocab: Option<usize>,
    /// What the logits output declares per position, when it declares it (a classifier's
    /// labels are not a vocabulary).
    pub logits_width: Option<usize>,
}

fn bad(msg: String) -> HybridError {
    HybridError::Model(ModelError::Input(msg))
}

fn declared(
    values: &[tract_onnx::pb::ValueInfoProto],
    name: &str,
) -> Option<(i32, Vec<Option<usize>>)> {
    let vi = values.iter().find(|v| v.name == name)?;
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((t.elem_type, dims))
}

fn onnx_type(elem: i32) -> DatumType {
    match elem {
        1 => DatumType::F32,
        6 => DatumType::I32,
        9 => DatumType::Bool,
        11 => DatumType::F64,
        _ => DatumType::I64,
    }
}

impl LmSignature {
    /// The roles of `runtime`'s inputs and outputs, or `None` when it has no `input_ids` input
    /// (not a language model). Inputs it cannot feed are an error naming them.
    pub fn detect(graph: &GraphProto, runtime: &Runtime) -> Result<Option<Self>, HybridError> {
        let find = |pat: &str| runtime.inputs.iter().position(|n| n.contains(pat));
        let Some(ids) = find("input_ids") else {
            return Ok(None);
        };
        let ids_type = match declared(&graph.input, &runtime.inputs[ids]) {
            Some((6, _)) => DatumType::I32,
            _ => DatumType::I64,
        };
        let mask = find("attention_mask").map(|i| {
            let dt = declared(&graph.input, &runtime.inputs[i])
                .map_or(DatumType::I64, |(e, _)| onnx_type(e));
            (i, dt)
        });
        let positions = find("position_ids");
        let mut past = Vec::new();
        for (i, name) in runtime.inputs.iter().enumerate() {
            if !name.starts_with("past") {
                if i != ids && Some(i) != mask.map(|m| m.0) && Some(i) != positions {
                    return Err(HybridError::Unsupported(format!(
                        "input `{name}` of this language model has no known role (expected \
                         input_ids, attention_mask, position_ids, past_key_values.*)"
                    )));
                }
                continue;
            }
            let (_, dims) = declared(&graph.input, name).ok_or_else(|| {
                HybridError::Unsupported(format!("past input `{name}` declares no shape"))
            })?;
            // [batch, heads, past, head_dim]: the past axis is the last symbolic one after batch.
            let axis = (1..dims.len())
                .rev()
                .find(|&a| dims[a].is_none())
                .ok_or_else(|| {
                    HybridError::Unsupported(format!(
                        "past input `{name}` has no symbolic length axis ({dims:?})"
                    ))
                })?;
            past.push((i, dims, axis));
        }
        let present: Vec<usize> = (0..runtime.outputs.len())
            .filter(|&i| runtime.outputs[i].starts_with("present"))
            .collect();
        if present.len() != past.len() {
            return Err(HybridError::Unsupported(format!(
                "{} past inputs but {} present outputs: they must pair up in graph order",
                past.len(),
                present.len()
            )));
        }
        let logits = runtime
            .outputs
            .iter()
            .position(|o| o == "logits")
            .or_else(|| (0..runtime.outputs.len()).find(|i| !present.contains(i)))
            .ok_or_else(|| HybridError::Unsupported("the model has no logits output".into()))?;
        let logits_width = declared(&graph.output, &runtime.outputs[logits])
            .and_then(|(_, d)| d.last().copied().flatten());
        let vocab = embedding_rows(graph, &runtime.inputs[ids]).or(logits_width);
        Ok(Some(Self {
            ids,
            ids_type,
            mask,
            positions,
            past,
            logits,
            present,
            vocab,
            logits_width,
        }))
    }

    pub fn has_cache(&self) -> bool {
        !self.past.is_empty()
    }

    /// Check token ids: int64/int32, `[batch, seq]`, within the vocabulary.
    pub fn check_ids(&self, ids: &Value) -> Result<Value, HybridError> {
        let ids = match ids.datum_type() {
            DatumType::I64 => ids.clone(),
            DatumType::I32 => ids
                .cast_to::<i64>()
                .map_err(ModelError::tract)?
                .into_owned(),
            other => {
                return Err(bad(format!(
                    "token ids are {other:?}: they must be int64 or int32"
                )))
            }
        };
        if ids.rank() != 2 || ids.shape().contains(&0) {
            return Err(bad(format!(
                "token ids have shape {:?}: expected [batch, tokens] with at least one token",
                ids.shape()
            )));
        }
        let values = crate::model::runner::i64_values(&ids, "the token ids")?;
        let limit = self.vocab.map_or(i64::MAX, |v| v as i64);
        if let Some(v) = values.iter().find(|&&v| v < 0 || v >= limit) {
            return Err(bad(format!(
                "token id {v} is outside the vocabulary [0, {})",
                self.vocab.map_or("?".into(), |v| v.to_string())
            )));
        }
        Ok(ids)
    }

    /// Every input for `ids` `[batch, seq]` after `past` (the previous step's presents; empty
    /// caches of length 0 when `None`).
    pub fn feeds(
        &self,
        inputs: usize,
        ids: Value,
        past: Option<Vec<Value>>,
    ) -> Result<Vec<Value>, HybridError> {
        let (batch, seq) = (ids.shape()[0], ids.shape()[1]);
        let past_len = match (&past, self.past.first()) {
            (Some(p), Some((_, _, axis))) => match p.first() {
                None => 0,
                Some(t) => *t.shape().get(*axis).ok_or_else(|| {
                    bad(format!(
                        "a cache tensor of shape {:?} has no past axis {axis}",
                        t.shape()
                    ))
                })?,
            },
            _ => 0,
        };
        let mut out: Vec<Option<Value>> = vec![None; inputs];
        let ids = if ids.datum_type() == self.ids_type {
            ids
        } else {
            ids.cast_to_dt(self.ids_type)
                .map_err(ModelError::tract)?
                .into_owned()
        };
        out[self.ids] = Some(ids);
        if let Some((i, dt)) = self.mask {
            let total = past_len + seq;
            let t = match dt {
                DatumType::F32 => Tensor::from_shape(&[batch, total], &vec![1f32; batch * total]),
                DatumType::Bool => Tensor::from_shape(&[batch, total], &vec![true; batch * total]),
                DatumType::I32 => Tensor::from_shape(&[batch, total], &vec![1i32; batch * total]),
                _ => Tensor::from_shape(&[batch, total], &vec![1i64; batch * total]),
            }
            .map_err(ModelError::tract)?;
            out[i] = Some(t);
        }
        if let Some(i) = self.positions {
            let row: Vec<i64> = (past_len..past_len + seq).map(|p| p as i64).collect();
            let all: Vec<i64> = (0..batch).flat_map(|_| row.iter().copied()).collect();
            out[i] = Some(Tensor::from_shape(&[batch, seq], &all).map_err(ModelError::tract)?);
        }
        match past {
            Some(values) => {
                if values.len() != self.past.len() {
                    return Err(bad(format!(
                        "{} cache tensors for {} past inputs",
                        values.len(),
                        self.past.len()
                    )));
                }
                for ((i, _, _), v) in self.past.iter().zip(values) {
                    out[*i] = Some(v);
                }
            }
            None => {
                for (i, dims, axis) in &self.past {
                    let shape: Vec<usize> = dims
                        .iter()
                        .enumerate()
                        .map(|(a, d)| match d {
                            _ if a == *axis => 0,
                            Some(v) => *v,
                            None if a == 0 => batch,
                            None => 1,
                        })
                        .collect();
                    out[*i] =
                        Some(Tensor::from_shape::<f32>(&shape, &[]).map_err(ModelError::tract)?);
                }
            }
        }
        out.into_iter()
            .enumerate()
            .map(|(i, v)| v.ok_or_else(|| bad(format!("input {i} has no value"))))
            .collect()
    }
}

/// Most tokens one `generate` call produces (a position table is far smaller anyway).
pub const MAX_NEW_TOKENS: usize = 1 << 16;

/// What `generate` produced and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct GenerateReport {
    /// The generated token ids (without the prompt).
    pub tokens: Vec<i64>,
    pub prompt_tokens: usize,
    /// Whether the model carries a KV cache (one row per remote module per new token).
    pub kv_cache: bool,
    /// The first forward pass, over the whole prompt (it yields the first new token).
    pub prefill_ms: f64,
    /// Mean time of each later step.
    pub decode_ms_per_token: f64,
    pub bytes_up_per_token: f64,
    pub bytes_down_per_token: f64,
    pub prefill: ForwardStats,
    /// Totals over every decode step.
    pub decode: ForwardStats,
    /// Each decode step's wall time and local-ops time, in order: the first steps plan the
    /// local segments for the decode shapes, later ones reuse those plans.
    pub decode_steps: Vec<DecodeStep>,
}

/// One decode step's times, in milliseconds.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct DecodeStep {
    pub ms: f64,
    pub local_ms: f64,
    /// Plans the local segments built in this step (none once the decode shapes are planned).
    pub local_plans: usize,
}

/// Rows of the embedding table that `ids` index: the data of a `Gather` (axis 0) whose indices
/// are the ids, through casts and reshapes; `None` when no such table is a constant.
fn embedding_rows<'g>(graph: &'g GraphProto, ids: &'g str) -> Option<usize> {
    const INDEX_VIEWS: &[&str] = &[
        "Cast",
        "Reshape",
        "Unsqueeze",
        "Squeeze",
        "Flatten",
        "Identity",
    ];
    let inits: std::collections::HashMap<&'g str, &'g tract_onnx::pb::TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    let producer: std::collections::HashMap<&'g str, &'g tract_onnx::pb::NodeProto> = graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect();
    // The table's shape, through Identity/Cast (a de-duplicated or cast initializer).
    let table_rows = |mut t: &'g str| -> Option<usize> {
        for _ in 0..8 {
            if let Some(init) = inits.get(t) {
                return (init.dims.len() == 2 && init.dims[0] > 0).then(|| init.dims[0] as usize);
            }
            let n = producer.get(t)?;
            if !matches!(n.op_type.as_str(), "Identity" | "Cast") {
                return None;
            }
            t = n.input.first()?;
        }
        None
    };
    let mut reached: Vec<&'g str> = vec![ids];
    let mut k = 0;
    while k < reached.len() && reached.len() < 64 {
        let t = reached[k];
        k += 1;
        for n in &graph.node {
            if n.input.first().map(String::as_str) == Some(t)
                && INDEX_VIEWS.contains(&n.op_type.as_str())
            {
                reached.extend(n.output.iter().map(String::as_str));
            }
            let axis0 = n
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .is_none_or(|a| a.i == 0);
            if n.op_type == "Gather" && axis0 && n.input.get(1).map(String::as_str) == Some(t) {
                if let Some(rows) = n.input.first().and_then(|d| table_rows(d)) {
                    return Some(rows);
                }
            }
        }
    }
    None
}

fn argmax_last(logits: &Value, expected: Option<usize>) -> Result<i64, HybridError> {
    let shape = logits.shape();
    let values = crate::model::runner::f32_values(logits, "the logits")?;
    let vocab = *shape
        .last()
        .ok_or_else(|| bad("the logits are a scalar".into()))?;
    if let Some(expected) = expected.filter(|&e| e != vocab) {
        return Err(HybridError::Unsupported(format!(
            "not a language model: its output has {vocab} values per position and its \
             vocabulary (the embedding table its ids index) {expected} tokens"
        )));
    }
    if shape.len() != 3 || shape[0] != 1 || vocab == 0 || values.len() < vocab {
        return Err(bad(format!(
            "logits of shape {shape:?}: generate expects [1, seq, vocab]"
        )));
    }
    let last = &values[values.len() - vocab..];
    let mut best = 0;
    for (i, &v) in last.iter().enumerate() {
        // Ties keep the lowest id, as torch.argmax does.
        if v > last[best] {
            best = i;
        }
    }
    Ok(best as i64)
}

/// Greedy decoding of `max_new` tokens after `prompt` (`[1, n]` int64).
pub(crate) async fn generate(
    sig: &LmSignature,
    runtime: &Runtime,
    backend: &dyn ModuleBackend,
    prompt: Value,
    max_new: usize,
) -> Result<GenerateReport, HybridError> {
    if max_new == 0 || max_new > MAX_NEW_TOKENS {
        return Err(bad(format!(
            "--max-new-tokens must be at least 1 and at most {MAX_NEW_TOKENS}, not {max_new}"
        )));
    }
    if let (Some(width), Some(vocab)) = (sig.logits_width, sig.vocab) {
        if width != vocab {
            return Err(HybridError::Unsupported(format!(
                "not a language model: its output has {width} values per position and its \
                 vocabulary (the embedding table its ids index) {vocab} tokens; generate needs \
                 a distribution over the vocabulary (use run for a classifier)"
            )));
        }
    }
    let prompt = sig.check_ids(&prompt)?;
    if prompt.shape()[0] != 1 {
        return Err(bad(format!(
            "the prompt has shape {:?}: generate takes one sequence, [1, tokens] or [tokens]",
            prompt.shape()
        )));
    }
    let mut sequence: Vec<i64> = crate::model::runner::i64_values(&prompt, "the prompt")?.to_vec();
    let prompt_tokens = sequence.len();
    let mut tokens = Vec::with_capacity(max_new);
    let mut past: Option<Vec<Value>> = None;
    let mut prefill = ForwardStats::default();
    let mut decode = ForwardStats::default();
    let (mut prefill_ms, mut decode_ms) = (0.0, 0.0);
    let mut decode_steps = Vec::with_capacity(max_new.saturating_sub(1));
    for step in 0..max_new {
        let ids: Vec<i64> = if step > 0 && sig.has_cache() {
            vec![*sequence.last().expect("a prompt has a token")]
        } else {
            sequence.clone()
        };
        let ids = Tensor::from_shape(&[1, ids.len()], &ids).map_err(ModelError::tract)?;
        let inputs = sig.feeds(runtime.inputs.len(), ids, past.take())?;
        let stats = Mutex::new(ForwardStats::default());
        let t = Instant::now();
        let mut outputs = runtime.run_all(inputs, backend, &stats).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let stats = stats.into_inner().expect("stats");
        let token = argmax_last(&outputs[sig.logits], sig.vocab)?;
        if step == 0 {
            prefill_ms = ms;
            prefill = stats;
        } else {
            decode_ms += ms;
            decode_steps.push(DecodeStep {
                ms,
                local_ms: stats.local_ms,
                local_plans: stats.local_plans,
            });
            decode.add(&stats);
        }
        if sig.has_cache() {
            past = Some(
                sig.present
                    .iter()
                    .map(|&i| std::mem::replace(&mut outputs[i], Tensor::from(0f32)))
                    .collect(),
            );
        }
        tokens.push(token);
        sequence.push(token);
    }
    let steps = (max_new - 1).max(1) as f64;
    Ok(GenerateReport {
        tokens,
        prompt_tokens,
        kv_cache: sig.has_cache(),
        prefill_ms,
        decode_ms_per_token: if max_new > 1 { decode_ms / steps } else { 0.0 },
        bytes_up_per_token: if max_new > 1 {
            decode.upload_bytes as f64 / steps
        } else {
            0.0
        },
        bytes_down_per_token: if max_new > 1 {
            decode.download_bytes as f64 / steps
        } else {
            0.0
        },
        prefill,
        decode,
        decode_steps,
    })
}
