//! The ONNX front's compile step: calibrate by running the cut graph in tract (each remote
//! module's input recorded by a float backend), then hand every module to the shared module
//! compiler ([`super::compile_module`]).

use std::collections::HashMap;
use std::sync::Mutex;

use super::backend::{ChainSamples, FloatBackend};
use super::runtime::{run_ready, ForwardStats};
use super::{compile_module, Calibration, CompileOptions, HybridError, HybridModel, ModuleReport};
use crate::model::{runner, ModelError, Value};
use crate::progress::Progress;
use crate::quant::QuantError;

/// Calibration samples per tract run when the batch axis is free.
const CALIBRATION_BATCH: usize = 64;

/// Each remote module's calibrated input range, and the input rows of the non-linear ones.
type CalibrationRecord = (HashMap<String, (f32, f32)>, HashMap<String, ChainSamples>);

impl HybridModel {
    /// Calibrate on `calibration` (samples along axis 0), then quantize and plan every remote
    /// module. A module whose accumulator cannot fit is refused, naming it and why.
    pub fn compile(
        &mut self,
        calibration: &Value,
        options: &CompileOptions,
        progress: &dyn Progress,
    ) -> Result<Vec<ModuleReport>, HybridError> {
        let samples = calibration.shape().first().copied().unwrap_or(0);
        if samples == 0 {
            return Err(QuantError::EmptyCalibration.into());
        }
        if self.private.is_some() {
            let batch = self.calibration_batch().min(samples);
            let first = calibration.slice(0, 0, batch).map_err(ModelError::tract)?;
            self.verify_cut(&first)?;
        }
        let mut ranges = HashMap::new();
        let mut samples = HashMap::new();
        // Modules with activations inside, and QAT layers whose input has no learned grid,
        // take a static input quantizer even under --dynamic: they need a calibrated range.
        let needs_range = self
            .linear
            .values()
            .any(|m| m.chain.is_some() || m.learned.as_ref().is_some_and(|l| l.input.is_none()));
        if !options.dynamic_inputs || needs_range {
            (ranges, samples) = self.calibrate(calibration, progress)?;
        }
        let order = self.remote_modules();
        progress.stage("compiling", order.len());
        let mut compiled = Vec::new();
        for name in &order {
            let m = self.linear.get(name).ok_or_else(|| {
                HybridError::Unsupported(format!(
                    "`{name}` has no float weights here (private info was cleared)"
                ))
            })?;
            let calibration = match (ranges.get(name), samples.get(name)) {
                (Some(&(lo, hi)), Some(s)) => Calibration::Rows {
                    lo,
                    hi,
                    rows: &s.rows,
                    map: s.map,
                },
                (Some(&(lo, hi)), None) => Calibration::Range(lo, hi),
                _ => Calibration::None,
            };
            compiled.push(compile_module(name, m, &calibration, options)?);
            progress.advance(1);
        }
        let reports = compiled.iter().map(|c| c.report.clone()).collect();
        self.compiled.clear_modules();
        for module in compiled {
            self.compiled.insert(module);
        }
        Ok(reports)
    }

    /// Run the float model on the calibration samples, recording each remote module's input
    /// range.
    fn calibrate(
        &self,
        calibration: &Value,
        progress: &dyn Progress,
    ) -> Result<CalibrationRecord, HybridError> {
        let shape = calibration.shape();
        let samples = *shape.first().ok_or_else(|| {
            HybridError::Model(ModelError::Input("calibration data is a scalar".into()))
        })?;
        if samples == 0 {
            return Err(QuantError::EmptyCalibration.into());
        }
        let declared = runner::declared_shape(self.client_graph(), &self.runtime.inputs[0]);
        let batch = self.calibration_batch();
        let backend = FloatBackend {
            modules: &self.linear,
            ranges: Mutex::new(HashMap::new()),
            samples: Some(Mutex::new(HashMap::new())),
        };
        let stats = Mutex::new(ForwardStats::default());
        progress.stage("calibrating", samples);
        let mut start = 0;
        while start < samples {
            let end = (start + batch).min(samples);
            if end - start != batch && declared.as_ref().is_some_and(|d| d[0].is_some()) {
                break; // a fixed batch axis: the remainder cannot be fed
            }
            let chunk = calibration
                .slice(0, start, end)
                .map_err(ModelError::tract)?;
            let inputs = self.complete_inputs(chunk)?;
            run_ready(self.runtime.run_all(inputs, &backend, &stats))?;
            progress.advance(end - start);
            start = end;
        }
        let samples = backend
            .samples
            .map(|s| s.into_inner().expect("samples"))
            .unwrap_or_default();
        Ok((backend.ranges.into_inner().expect("ranges"), samples))
    }

    /// Samples per calibration run: the declared batch size, or [`CALIBRATION_BATCH`].
    fn calibration_batch(&self) -> usize {
        runner::declared_shape(self.client_graph(), &self.runtime.inputs[0])
            .and_then(|d| d.first().copied().flatten())
            .unwrap_or(CALIBRATION_BATCH)
    }
}
