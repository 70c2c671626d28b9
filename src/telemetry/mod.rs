//! Logs, traces and metrics.
//!
//! - Logs: `tracing` with an env filter (`telemetry.log`, or `RUST_LOG`).
//! - Traces: `telemetry.exporter = "otlp"` exports spans over OTLP/HTTP; `"stdout"` logs every
//!   span's close with its duration; `"off"` (the default) neither. The W3C `traceparent` crosses
//!   HTTP headers and Redis job fields, so one forward call is one trace.
//! - Metrics: [`metrics`], rendered on each service's `GET /metrics`.

pub mod metrics;

use std::collections::HashMap;
use std::path::PathBuf;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{TelemetryConfig, TraceExporter};

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The OTLP exporter uses a blocking HTTP client: flush it on a plain thread, never on
            // an async runtime's worker.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Install the global subscriber (once per process; later calls are no-ops).
pub fn init(config: &TelemetryConfig) -> TelemetryGuard {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let span_events = if config.exporter == TraceExporter::Stdout {
        FmtSpan::CLOSE
    } else {
        FmtSpan::NONE
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_span_events(span_events);
    let provider = match config.exporter {
        TraceExporter::Otlp => match otlp_provider(config) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("warning: OTLP exporter not started ({e}); traces are off");
                None
            }
        },
        _ => None,
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Each layer has its own filter: a quiet log level must not silence the traces.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(config.service_name.clone()))
            .with_filter(Targets::new().with_target("hyfhe", Level::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    TelemetryGuard { provider }
}

fn otlp_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    // The exporter's HTTP client is reqwest built without a default crypto provider (ours is
    // chosen in `tls`); building it with none installed panics, even for a plain endpoint.
    crate::tls::install_provider();
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(&config.otlp_endpoint);
    if config.otlp_endpoint.starts_with("https://") {
        builder = builder.with_http_client(https_client(config)?);
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The exporter's client for an `https://` collector: the API client's trust (the system's roots,
/// plus `otlp_ca_cert` when set). Built on a thread of its own: a blocking reqwest client must
/// not be made (or dropped) inside the async runtime that `init` may be called from.
fn https_client(config: &TelemetryConfig) -> Result<reqwest::blocking::Client, String> {
    let ca = (!config.otlp_ca_cert.is_empty()).then(|| PathBuf::from(&config.otlp_ca_cert));
    let tls = crate::tls::client_config(ca.as_deref()).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| format!("OTLP HTTPS client: {e}"))
    })
    .join()
    .map_err(|_| "OTLP HTTPS client: building it panicked".to_string())?
}

/// The current span's W3C trace context, when traces are exported.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// Make `span` a child of the remote span `traceparent` names.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let _ = span.set_parent(cx);
    }
}
