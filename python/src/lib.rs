//! `hyfhe._native`: the Rust core under the `hyfhe` Python package.
//!
//! Two classes and a function; `hyfhe.torch` builds `HybridFHEModel` on them:
//!
//! - [`Modules`]: one model's compiled remote modules. Compiled here from a torch module's tensors
//!   (`nn.Linear`, HF `Conv1D`, `Conv2d`) or from an in-memory ONNX export of a block with
//!   activations inside, by the same module compiler `hyfhe compile` uses; run in `disable`,
//!   `simulate` or `execute`; saved to and loaded from the CLI's `client/`, `server/`, `private/`
//!   trees.
//! - [`RemoteSession`]: keys generated here, evaluation keys uploaded, modules run on a server.
//! - [`download_client`]: a served model's client tree.
//!
//! Every call that computes releases the GIL and runs on this process's own rayon pool and tokio
//! runtime, which are built again in a forked child (a DataLoader worker: the parent's threads do
//! not exist there), while the calling thread waits in slices and checks for signals, so Ctrl-C
//! interrupts a long call (the work already running finishes in the background; its result is
//! dropped).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use hyfhe::client::{Client, ClientError};
use hyfhe::fhe::Precision;
use hyfhe::hybrid::{
    compile_backward, compile_learned, compile_module, linear_from_weights, Calibration,
    CompileOptions, CompiledModule, CompiledModules, ForwardStats, Front, HybridError,
    LearnedQuantizers, Loaded, Mode, ModuleReport, Trees,
};
use hyfhe::model::{runner, ConvGeometry, LinearKind, ModelError, OnnxModel, Value};
use hyfhe::progress::Silent;
use hyfhe::quant::{AffineQuantizer, InputQuantization, QuantizedWeights};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyKeyError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

create_exception!(
    _native,
    HyfheError,
    PyException,
    "An error of the hyfhe core."
);
create_exception!(
    _native,
    ServerError,
    HyfheError,
    "The server refused a request: args are (message, HTTP status, error code)."
);
create_exception!(
    _native,
    ServerUnreachable,
    HyfheError,
    "The server could not be reached (connection refused, TLS, timeout)."
);

/// An error on its way from a worker thread to Python (a `PyErr` is built on the caller's
/// thread, with the GIL).
enum Failure {
    Input(String),
    UnknownModule(String),
    Core(String),
    Server {
        message: String,
        status: u16,
        code: String,
    },
    Unreachable(String),
    Panic(String),
}

impl From<HybridError> for Failure {
    fn from(e: HybridError) -> Self {
        match e {
            HybridError::Model(ModelError::Input(m)) => Failure::Input(m),
            HybridError::UnknownRemote(m) => {
                Failure::UnknownModule(format!("no remote module `{m}` was compiled in this model"))
            }
            e @ HybridError::NoSuchModule { .. } => Failure::UnknownModule(e.to_string()),
            HybridError::RemoteRefused {
                status,
                code,
                message,
            } => Failure::Server {
                message: format!("server answered {status} {code}: {message}"),
                status,
                code,
            },
            e @ HybridError::RemoteUnreachable(_) => Failure::Unreachable(e.to_string()),
            other => Failure::Core(other.to_string()),
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api {
                status,
                ref code,
                ref message,
            } => Failure::Server {
                message: format!("server answered {status} {code}: {message}"),
                status,
                code: code.clone(),
            },
            ClientError::Transport { .. } | ClientError::Url(_) => {
                Failure::Unreachable(e.to_string())
            }
            other => Failure::Core(other.to_string()),
        }
    }
}

impl From<Failure> for PyErr {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Input(m) => PyValueError::new_err(m),
            Failure::UnknownModule(m) => PyKeyError::new_err(m),
            Failure::Core(m) => HyfheError::new_err(m),
            Failure::Server {
                message,
                status,
                code,
            } => ServerError::new_err((message, status, code)),
            Failure::Unreachable(m) => ServerUnreachable::new_err(m),
            Failure::Panic(m) => PyRuntimeError::new_err(format!("hyfhe internal error: {m}")),
        }
    }
}

type Outcome<T> = Result<T, Failure>;

/// This process's threads: built on first use and again after a fork.
struct Process {
    pid: u32,
    pool: rayon::ThreadPool,
    runtime: tokio::runtime::Runtime,
}

static PROCESS: Mutex<Option<Arc<Process>>> = Mutex::new(None);

fn process() -> PyResult<Arc<Process>> {
    let pid = std::process::id();
    let mut slot = PROCESS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = slot.as_ref() {
        if p.pid == pid {
            return Ok(p.clone());
        }
        // A forked child: the parent's threads are not here, so its pool and runtime cannot run
        // or even shut down. Leak them; this process gets its own.
        if let Some(old) = slot.take() {
            std::mem::forget(old);
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("hyfhe-{i}"))
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("starting hyfhe's thread pool: {e}")))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("hyfhe-io")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("starting hyfhe's runtime: {e}")))?;
    let p = Arc::new(Process { pid, pool, runtime });
    *slot = Some(p.clone());
    Ok(p)
}

/// How often a waiting call checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run `work` on this process's pool without the GIL, waking to check for signals.
fn run<T, F>(py: Python<'_>, work: F) -> PyResult<T>
where
    T: Send + 'static,
    F: FnOnce(&Process) -> Outcome<T> + Send + 'static,
{
    let p = process()?;
    let slot = Arc::new(Slot {
        value: Mutex::new(None),
        ready: Condvar::new(),
    });
    let (tx, worker) = (slot.clone(), p.clone());
    p.pool.spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(&worker)))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                Err(Failure::Panic(message))
            });
        *tx.value.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        tx.ready.notify_all();
    });
    loop {
        let done = py.detach(|| {
            let value = slot.value.lock().unwrap_or_else(|e| e.into_inner());
            let (mut value, _) = slot
                .ready
                .wait_timeout_while(value, SIGNAL_POLL, |v| v.is_none())
                .unwrap_or_else(|e| e.into_inner());
            value.take()
        });
        match done {
            Some(result) => return result.map_err(PyErr::from),
            None => py.check_signals()?,
        }
    }
}

/// Where a pool job leaves its result for the waiting caller.
struct Slot<T> {
    value: Mutex<Option<Outcome<T>>>,
    ready: Condvar,
}

/// A numpy array as a tensor (one copy, made while the GIL is held).
fn tensor(x: &PyReadonlyArrayDyn<'_, f32>) -> PyResult<Value> {
    let shape = x.shape().to_vec();
    let value = match x.as_slice() {
        Ok(values) => runner::f32_tensor(&shape, values),
        Err(_) => {
            let values: Vec<f32> = x.as_array().iter().copied().collect();
            runner::f32_tensor(&shape, &values)
        }
    };
    value.map_err(|e| PyValueError::new_err(e.to_string()))
}

fn to_numpy<'py>(py: Python<'py>, y: &Value) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let values = runner::f32_values(y, "a module's output")
        .map_err(|e| HyfheError::new_err(e.to_string()))?;
    PyArray1::from_slice(py, values).reshape(y.shape().to_vec())
}

/// `y`, or `(y, stats)` when asked.
fn answer<'py>(
    py: Python<'py>,
    y: &Value,
    stats: Option<(&ForwardStats, f64)>,
) -> PyResult<Bound<'py, PyAny>> {
    let y = to_numpy(py, y)?.into_any();
    let Some((s, rust_ms)) = stats else {
        return Ok(y);
    };
    let d = PyDict::new(py);
    // The whole module call inside Rust (what a Rust client pays for the same rows): the
    // binding's own cost is a caller's wall time minus this.
    d.set_item("rust_ms", rust_ms)?;
    for (k, v) in [
        ("quantize_ms", s.quantize_ms),
        ("encrypt_ms", s.encrypt_ms),
        ("fhe_ms", s.fhe_ms),
        ("decrypt_ms", s.decrypt_ms),
        ("dequantize_ms", s.dequantize_ms),
        ("clear_ms", s.clear_ms),
    ] {
        d.set_item(k, v)?;
    }
    d.set_item("requests", s.requests)?;
    d.set_item("upload_bytes", s.upload_bytes)?;
    d.set_item("download_bytes", s.download_bytes)?;
    Ok((y, d).into_pyobject(py)?.into_any())
}

fn parse_mode(mode: &str) -> PyResult<Mode> {
    match mode {
        "disable" => Ok(Mode::Disable),
        "simulate" => Ok(Mode::Simulate),
        "execute" => Ok(Mode::Execute),
        other => Err(PyValueError::new_err(format!(
            "mode `{other}` does not run here: Modules.forward takes disable, simulate or \
             execute (remote runs through a RemoteSession, torch in PyTorch)"
        ))),
    }
}

fn parse_precision(precision: &str) -> PyResult<Precision> {
    match precision {
        "exact" => Ok(Precision::Exact),
        "compact" => Ok(Precision::Compact),
        other => Err(PyValueError::new_err(format!(
            "precision `{other}`: expected exact or compact"
        ))),
    }
}

fn options(
    n_bits: u32,
    dynamic: bool,
    precision: &str,
    rounding_bits: Option<u32>,
) -> PyResult<CompileOptions> {
    let mut o = CompileOptions {
        n_bits,
        dynamic_inputs: dynamic,
        precision: parse_precision(precision)?,
        ..CompileOptions::default()
    };
    if let Some(r) = rounding_bits {
        o.rounding_bits = r;
    }
    Ok(o)
}

fn owned(x: &PyReadonlyArrayDyn<'_, f32>) -> Vec<f32> {
    x.as_array().iter().copied().collect()
}

fn report_dict<'py>(py: Python<'py>, r: &ModuleReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("module", &r.module)?;
    d.set_item("in_features", r.plan.in_features)?;
    d.set_item("out_features", r.plan.out_features)?;
    d.set_item("precision", r.plan.precision.to_string())?;
    d.set_item("input", format!("{:?}", r.input))?;
    d.set_item("non_linear", r.chain.is_some())?;
    d.set_item("backward_of", r.backward_of.clone())?;
    d.set_item("exposure", r.exposure().trim().to_string())?;
    if let Some(c) = &r.chain {
        d.set_item("activations", c.activations.clone())?;
        d.set_item("bootstraps_per_row", c.bootstraps_per_row)?;
        d.set_item("neighbour_rate", c.neighbour_rate)?;
    }
    Ok(d)
}

/// One model's compiled remote modules.
#[pyclass(module = "hyfhe._native")]
struct Modules {
    inner: Arc<RwLock<CompiledModules>>,
    /// The client tree's files, when loaded from disk (the torch state lives there).
    client_files: BTreeMap<String, Vec<u8>>,
}

impl Modules {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CompiledModules> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, py: Python<'_>, name: String, m: LinearModuleArgs) -> PyResult<Py<PyDict>> {
        self.install(py, move || {
            Ok(compile_module(
                &name,
                &m.module,
                &m.calibration(),
                &m.options,
            )?)
        })
    }

    /// Compile on the pool (GIL released) and keep the module; its report as a dict.
    fn install<F>(&self, py: Python<'_>, compile: F) -> PyResult<Py<PyDict>>
    where
        F: FnOnce() -> Outcome<CompiledModule> + Send + 'static,
    {
        let inner = self.inner.clone();
        let report = run(py, move |_| {
            let compiled = compile()?;
            let report = compiled.report.clone();
            inner
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(compiled);
            Ok(report)
        })?;
        Ok(report_dict(py, &report)?.unbind())
    }
}

impl Modules {
    /// A linear layer (dense or conv) from its tensors; `shape` is (in, out) features.
    #[allow(clippy::too_many_arguments)]
    fn add_weights(
        &self,
        py: Python<'_>,
        name: String,
        kind: LinearKind,
        shape: (usize, usize),
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
        input_range: Option<(f32, f32)>,
        options: CompileOptions,
    ) -> PyResult<Py<PyDict>> {
        check_range(input_range)?;
        let module = linear_from_weights(&name, kind, shape.0, shape.1, weight, bias)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let args = LinearModuleArgs {
            module,
            range: input_range,
            rows: None,
            options,
        };
        self.add(py, name, args)
    }
}

/// What [`Modules::add`] compiles, owned so it can cross to the pool.
struct LinearModuleArgs {
    module: hyfhe::model::LinearModule,
    range: Option<(f32, f32)>,
    rows: Option<Vec<f32>>,
    options: CompileOptions,
}

impl LinearModuleArgs {
    fn calibration(&self) -> Calibration<'_> {
        match (self.range, &self.rows) {
            (Some((lo, hi)), Some(rows)) => Calibration::Rows {
                lo,
                hi,
                rows,
                map: None,
            },
            (Some((lo, hi)), None) => Calibration::Range(lo, hi),
            _ => Calibration::None,
        }
    }
}

/// A conv's (stride, padding as (top, left, bottom, right), dilation).
type ConvArgs = ((usize, usize), (usize, usize, usize, usize), (usize, usize));

fn conv_geometry(
    channels: usize,
    (kh, kw): (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize, usize, usize),
    dilation: (usize, usize),
) -> ConvGeometry {
    ConvGeometry {
        in_channels: channels,
        kernel: [kh, kw],
        stride: [stride.0, stride.1],
        pads: [padding.0, padding.1, padding.2, padding.3],
        dilation: [dilation.0, dilation.1],
    }
}

fn check_range(range: Option<(f32, f32)>) -> PyResult<()> {
    if let Some((lo, hi)) = range {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(PyValueError::new_err(format!(
                "input_range ({lo}, {hi}) must be finite with low <= high"
            )));
        }
    }
    Ok(())
}

#[pymethods]
impl Modules {
    /// No modules yet; `compile_*` add them.
    #[new]
    fn new(model_name: &str) -> PyResult<Self> {
        if model_name.is_empty()
            || !model_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(PyValueError::new_err(format!(
                "model name {model_name:?}: use letters, digits, `_`, `-` and `.` (it names the \
                 model on the server and in URLs)"
            )));
        }
        Ok(Self {
            inner: Arc::new(RwLock::new(CompiledModules::new(model_name, Front::Torch))),
            client_files: BTreeMap::new(),
        })
    }

    /// Load the trees at `path` (`trees`: "client" for a client, "all" for the owner).
    #[staticmethod]
    #[pyo3(signature = (path, trees = "all"))]
    fn load(py: Python<'_>, path: PathBuf, trees: &str) -> PyResult<Self> {
        let trees = match trees {
            "client" => Trees::Client,
            "all" => Trees::All,
            other => {
                return Err(PyValueError::new_err(format!(
                    "trees `{other}`: expected client or all"
                )))
            }
        };
        let Loaded {
            modules, client, ..
        } = run(py, move |_| Ok(CompiledModules::load(&path, trees)?))?;
        Ok(Self {
            inner: Arc::new(RwLock::new(modules)),
            client_files: client.files,
        })
    }

    #[getter]
    fn name(&self) -> String {
        self.read().name().to_string()
    }

    /// "torch" or "onnx": which front compiled the model.
    #[getter]
    fn front(&self) -> String {
        self.read().front().to_string()
    }

    #[getter]
    fn module_names(&self) -> Vec<String> {
        self.read().module_names().to_vec()
    }

    /// Drop every compiled module (a recompile replaces them all, backward modules included;
    /// the execute keys stay).
    fn clear(&self) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear_modules();
    }

    /// Whether this side holds the quantized weights (owner, before saving).
    fn has_server(&self) -> bool {
        self.read().server_modules().is_some()
    }

    /// A module's client spec, summarised.
    fn spec<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyDict>> {
        let m = self.read();
        let s = m
            .spec(name)
            .map_err(|e| PyKeyError::new_err(e.to_string()))?;
        let d = PyDict::new(py);
        d.set_item("module", &s.module)?;
        d.set_item(
            "kind",
            match s.kind {
                LinearKind::Dense => "dense",
                LinearKind::Conv(_) => "conv2d",
            },
        )?;
        d.set_item("in_features", s.in_features)?;
        d.set_item("out_features", s.out_features)?;
        d.set_item("precision", s.plan.precision.to_string())?;
        d.set_item("non_linear", s.output_plan.is_some())?;
        d.set_item("input_bits", s.plan.input_bits)?;
        d.set_item("weight_bits", s.plan.weight_bits)?;
        match s.input {
            InputQuantization::Static(q) => {
                d.set_item("input_scale", q.scale)?;
                d.set_item("input_zero_point", q.zero_point)?;
            }
            InputQuantization::DynamicPerRow { .. } => d.set_item("input_scale", "per row")?,
        }
        d.set_item("sha256", s.sha256())?;
        Ok(d)
    }

    /// Compile a linear layer from its weight (`out × in`, `nn.Linear`'s layout) and bias.
    /// `input_range` is the calibrated (min, max) of its input; `dynamic` quantizes each row
    /// by its own range at run time instead.
    #[pyo3(signature = (name, weight, bias = None, input_range = None, n_bits = 8, dynamic = false, precision = "exact"))]
    #[allow(clippy::too_many_arguments)]
    fn compile_linear(
        &self,
        py: Python<'_>,
        name: String,
        weight: PyReadonlyArrayDyn<'_, f32>,
        bias: Option<PyReadonlyArrayDyn<'_, f32>>,
        input_range: Option<(f32, f32)>,
        n_bits: u32,
        dynamic: bool,
        precision: &str,
    ) -> PyResult<Py<PyDict>> {
        let [out, inp] = weight.shape()[..] else {
            return Err(PyValueError::new_err(format!(
                "`{name}`: a linear weight is 2-D (out × in), got shape {:?}",
                weight.shape()
            )));
        };
        let options = options(n_bits, dynamic, precision, None)?;
        let (kind, weight, bias) = (LinearKind::Dense, owned(&weight), bias.as_ref().map(owned));
        self.add_weights(
            py,
            name,
            kind,
            (inp, out),
            weight,
            bias,
            input_range,
            options,
        )
    }

    /// Compile the backward module `name` of the dense module `forward` (already compiled
    /// here), from the same float weight (`out × in`): `Wᵀ` on the server, the input gradient
    /// `g·W` for a gradient `g` of `out` values per row, quantized per row at run time to
    /// `n_bits`. No new secret on the client: its spec holds no weights.
    #[pyo3(signature = (name, forward, weight, n_bits = 8, precision = "exact"))]
    fn compile_backward(
        &self,
        py: Python<'_>,
        name: String,
        forward: String,
        weight: PyReadonlyArrayDyn<'_, f32>,
        n_bits: u32,
        precision: &str,
    ) -> PyResult<Py<PyDict>> {
        let [out, inp] = weight.shape()[..] else {
            return Err(PyValueError::new_err(format!(
                "`{forward}`: a linear weight is 2-D (out × in), got shape {:?}",
                weight.shape()
            )));
        };
        if let Some(existing) = self.read().specs().get(&name) {
            if existing.backward_of.as_deref() != Some(forward.as_str()) {
                return Err(PyValueError::new_err(format!(
                    "`{name}` is already a module of this model: a backward module needs a name \
                     of its own"
                )));
            }
        }
        match self.read().specs().get(&forward) {
            Some(f) if !f.is_plain_dense() => {
                return Err(PyValueError::new_err(format!(
                    "`{forward}` is not a dense linear module: backward modules are built for \
                     dense layers only"
                )))
            }
            Some(f) if f.in_features == inp && f.out_features == out => {}
            Some(f) => {
                return Err(PyValueError::new_err(format!(
                "`{forward}` was compiled {}→{}, the weight given for its backward is {inp}→{out}",
                f.in_features, f.out_features
            )))
            }
            None => {
                return Err(PyKeyError::new_err(format!(
                    "no compiled module `{forward}`: compile the forward module first"
                )))
            }
        }
        let options = options(n_bits, true, precision, None)?;
        let m = linear_from_weights(&forward, LinearKind::Dense, inp, out, owned(&weight), None)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        self.install(py, move || {
            Ok(compile_backward(&name, &forward, &m, &options)?)
        })
    }

    /// Compile a `Conv2d` (groups 1, zero padding) from its weight (`out × C × kh × kw`), bias,
    /// stride, padding (top, left, bottom, right) and dilation.
    #[pyo3(signature = (name, weight, bias, stride, padding, dilation, input_range = None, n_bits = 8, dynamic = false, precision = "exact"))]
    #[allow(clippy::too_many_arguments)]
    fn compile_conv2d(
        &self,
        py: Python<'_>,
        name: String,
        weight: PyReadonlyArrayDyn<'_, f32>,
        bias: Option<PyReadonlyArrayDyn<'_, f32>>,
        stride: (usize, usize),
        padding: (usize, usize, usize, usize),
        dilation: (usize, usize),
        input_range: Option<(f32, f32)>,
        n_bits: u32,
        dynamic: bool,
        precision: &str,
    ) -> PyResult<Py<PyDict>> {
        let [out, channels, kh, kw] = weight.shape()[..] else {
            return Err(PyValueError::new_err(format!(
                "`{name}`: a conv weight is 4-D (out × C × kh × kw), got shape {:?}",
                weight.shape()
            )));
        };
        let geometry = conv_geometry(channels, (kh, kw), stride, padding, dilation);
        let options = options(n_bits, dynamic, precision, None)?;
        let (kind, weight, bias) = (
            LinearKind::Conv(geometry),
            owned(&weight),
            bias.as_ref().map(owned),
        );
        let shape = (channels * kh * kw, out);
        self.add_weights(py, name, kind, shape, weight, bias, input_range, options)
    }

    /// Compile a quantization-aware-trained layer (Brevitas `QuantLinear`/`QuantConv2d`) with the
    /// quantizers it learned: `codes` are its integer weights (`out × in`, or `out × C × kh × kw`
    /// with `conv` = (stride, padding, dilation)), `weight_scale`/`weight_zero_point` one value
    /// per tensor or per output channel, `bias` its float bias, and `input` its input quantizer
    /// as `(bits, scale, zero_point)` over unsigned codes (a signed b-bit quantizer has zero
    /// point 2^(b-1)); a layer without one takes an `n_bits` quantizer over `input_range`.
    #[pyo3(signature = (name, codes, weight_bits, weight_scale, weight_zero_point, bias, input = None, input_range = None, n_bits = 8, conv = None, precision = "exact"))]
    #[allow(clippy::too_many_arguments)]
    fn compile_learned(
        &self,
        py: Python<'_>,
        name: String,
        codes: PyReadonlyArrayDyn<'_, i8>,
        weight_bits: u32,
        weight_scale: Vec<f32>,
        weight_zero_point: Vec<i32>,
        bias: Option<PyReadonlyArrayDyn<'_, f32>>,
        input: Option<(u32, f32, i32)>,
        input_range: Option<(f32, f32)>,
        n_bits: u32,
        conv: Option<ConvArgs>,
        precision: &str,
    ) -> PyResult<Py<PyDict>> {
        let shape = codes.shape().to_vec();
        let (kind, inp, out) = match (&shape[..], conv) {
            (&[out, inp], None) => (LinearKind::Dense, inp, out),
            (&[out, channels, kh, kw], Some((stride, padding, dilation))) => {
                let geometry = conv_geometry(channels, (kh, kw), stride, padding, dilation);
                (LinearKind::Conv(geometry), channels * kh * kw, out)
            }
            (s, conv) => {
                return Err(PyValueError::new_err(format!(
                    "`{name}`: weight codes of shape {s:?} with conv={}: a linear layer's are \
                     2-D (out × in), a conv's 4-D (out × C × kh × kw) with its geometry",
                    conv.is_some()
                )))
            }
        };
        let invalid = |e: hyfhe::quant::QuantError| PyValueError::new_err(format!("`{name}`: {e}"));
        let codes: Vec<i8> = codes.as_array().iter().copied().collect();
        let weights = QuantizedWeights::from_codes(
            codes,
            out,
            inp,
            weight_bits,
            weight_scale,
            weight_zero_point,
        )
        .map_err(invalid)?;
        check_range(input_range)?;
        let input = match (input, input_range) {
            (Some((bits, scale, zero_point)), _) => AffineQuantizer::new(bits, scale, zero_point),
            (None, Some((lo, hi))) => AffineQuantizer::from_range(lo, hi, n_bits),
            (None, None) => {
                return Err(PyValueError::new_err(format!(
                    "`{name}`: neither a learned input quantizer nor a calibrated input range"
                )))
            }
        }
        .map_err(invalid)?;
        // The float weights the learned integers stand for (what `disable` mode multiplies).
        let dequantized = (0..out)
            .flat_map(|j| {
                let (s, zp) = (weights.scale(j), weights.zero_point(j));
                weights
                    .row(j)
                    .iter()
                    .map(move |&q| s * (q as i32 - zp) as f32)
            })
            .collect();
        let module =
            linear_from_weights(&name, kind, inp, out, dequantized, bias.as_ref().map(owned))
                .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let options = options(weight_bits, false, precision, None)?;
        self.install(py, move || {
            let learned = LearnedQuantizers { weights, input };
            Ok(compile_learned(&name, &module, learned, &options)?)
        })
    }

    /// Compile a module with activations inside from an ONNX export of it: `path` names the
    /// module in that export, `calibration` holds its recorded input rows (`rows × in`).
    #[pyo3(signature = (name, onnx, path, calibration, n_bits = 8, rounding_bits = None))]
    #[allow(clippy::too_many_arguments)]
    fn compile_onnx(
        &self,
        py: Python<'_>,
        name: String,
        onnx: Vec<u8>,
        path: String,
        calibration: PyReadonlyArrayDyn<'_, f32>,
        n_bits: u32,
        rounding_bits: Option<u32>,
    ) -> PyResult<Py<PyDict>> {
        let rows: Vec<f32> = calibration.as_array().iter().copied().collect();
        if rows.is_empty() || !rows.iter().all(|v| v.is_finite()) {
            return Err(PyValueError::new_err(format!(
                "`{name}`: calibration rows must be non-empty and finite"
            )));
        }
        let (lo, hi) = rows
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                (l.min(v), h.max(v))
            });
        let options = options(n_bits, false, "exact", rounding_bits)?;
        self.install(py, move || {
            let model = OnnxModel::from_bytes(&onnx).map_err(HybridError::from)?;
            let module = model.linear_module(&path).map_err(HybridError::from)?;
            if !rows.len().is_multiple_of(module.in_features) {
                return Err(Failure::Input(format!(
                    "`{name}`: {} calibration values are not rows of {}",
                    rows.len(),
                    module.in_features
                )));
            }
            let calibration = Calibration::Rows {
                lo,
                hi,
                rows: &rows,
                map: None,
            };
            Ok(compile_module(&name, &module, &calibration, &options)?)
        })
    }

    /// Module `name` on `x` (its input tensor: `[..., in]`, or NCHW for a conv) in `mode`:
    /// disable, simulate or execute. With `stats`, returns `(y, stats)`: the time each stage
    /// took inside Rust, in ms, and the bytes a server would see.
    #[pyo3(signature = (name, x, mode, stats = false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        name: String,
        x: PyReadonlyArrayDyn<'py, f32>,
        mode: &str,
        stats: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mode = parse_mode(mode)?;
        let x = tensor(&x)?;
        let inner = self.inner.clone();
        let (y, s, rust_ms) = run(py, move |_| {
            let m = inner.read().unwrap_or_else(|e| e.into_inner());
            let t0 = Instant::now();
            let (y, s) = m.forward_module(&name, x, mode)?;
            Ok((y, s, t0.elapsed().as_secs_f64() * 1e3))
        })?;
        answer(py, &y, stats.then_some((&s, rust_ms)))
    }

    /// Write `path/client` (specs and `client_files`), `path/server` and `path/private`
    /// (`private_files`), then drop the quantized weights from this object.
    #[pyo3(signature = (path, client_files, private_files, force = false))]
    fn save(
        &self,
        py: Python<'_>,
        path: PathBuf,
        client_files: BTreeMap<String, Vec<u8>>,
        private_files: BTreeMap<String, Vec<u8>>,
        force: bool,
    ) -> PyResult<()> {
        let inner = self.inner.clone();
        run(py, move |_| {
            let mut m = inner.write().unwrap_or_else(|e| e.into_inner());
            m.save_and_clear(
                &path,
                client_files.into_iter().collect(),
                private_files.into_iter().collect(),
                force,
            )?;
            Ok(())
        })
    }

    /// A file of the loaded client tree (`None` when absent).
    fn client_file<'py>(&self, py: Python<'py>, path: &str) -> Option<Bound<'py, PyBytes>> {
        self.client_files.get(path).map(|b| PyBytes::new(py, b))
    }
}

/// An open session on a server for one model's modules.
#[pyclass(module = "hyfhe._native")]
struct RemoteSession {
    modules: Arc<RwLock<CompiledModules>>,
    session: Arc<hyfhe::client::RemoteSession>,
}

#[pymethods]
impl RemoteSession {
    /// Check the server compiled these modules as the local specs say, generate keys (seconds)
    /// and open a session uploading the evaluation keys: `key="full"` (every encoding) or
    /// `"lean"` (the automorphism keys alone, about 1 MiB; linear modules only).
    #[new]
    #[pyo3(signature = (modules, url, api_key, ca_cert = None, key = "full"))]
    fn new(
        py: Python<'_>,
        modules: &Modules,
        url: String,
        api_key: String,
        ca_cert: Option<PathBuf>,
        key: &str,
    ) -> PyResult<Self> {
        let profile: hyfhe::fhe::KeyProfile = key.parse().map_err(PyValueError::new_err)?;
        let inner = modules.inner.clone();
        let shared = inner.clone();
        let session = run(py, move |p| {
            let client = Client::with_ca_cert(&url, &api_key, ca_cert.as_deref())?;
            let m = shared.read().unwrap_or_else(|e| e.into_inner());
            let session = p
                .runtime
                .block_on(client.open_session_as(&m, profile, &Silent))?;
            Ok(session)
        })?;
        Ok(Self {
            modules: inner,
            session: Arc::new(session),
        })
    }

    /// Module `name` on `x`, evaluated by the server (`stats`: as `Modules.forward`).
    #[pyo3(signature = (name, x, stats = false))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        name: String,
        x: PyReadonlyArrayDyn<'py, f32>,
        stats: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let x = tensor(&x)?;
        let (inner, session) = (self.modules.clone(), self.session.clone());
        let (y, s, rust_ms) = run(py, move |p| {
            let m = inner.read().unwrap_or_else(|e| e.into_inner());
            let t0 = Instant::now();
            let (y, s) = p
                .runtime
                .block_on(m.forward_module_remote(&name, x, session.as_ref()))?;
            Ok((y, s, t0.elapsed().as_secs_f64() * 1e3))
        })?;
        answer(py, &y, stats.then_some((&s, rust_ms)))
    }

    /// Close the session on the server (its keys go with it).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let session = self.session.clone();
        run(py, move |p| Ok(p.runtime.block_on(session.close())?))
    }

    #[getter]
    fn id(&self) -> String {
        self.session.id()
    }

    /// Bytes of evaluation keys this session uploaded.
    #[getter]
    fn uploaded_key_bytes(&self) -> usize {
        self.session.uploaded_key_bytes()
    }
}

/// Download the client tree of `model` from a server into `path/client` (verified on load).
#[pyfunction]
#[pyo3(signature = (url, api_key, model, path, ca_cert = None))]
fn download_client(
    py: Python<'_>,
    url: String,
    api_key: String,
    model: String,
    path: PathBuf,
    ca_cert: Option<PathBuf>,
) -> PyResult<()> {
    run(py, move |p| {
        let client = Client::with_ca_cert(&url, &api_key, ca_cert.as_deref())?;
        Ok(p.runtime.block_on(client.download_model(&model, &path))?)
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Modules>()?;
    m.add_class::<RemoteSession>()?;
    m.add_function(wrap_pyfunction!(download_client, m)?)?;
    m.add("HyfheError", m.py().get_type::<HyfheError>())?;
    m.add("ServerError", m.py().get_type::<ServerError>())?;
    m.add("ServerUnreachable", m.py().get_type::<ServerUnreachable>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
