//! Per-tenant usage, what a SaaS operator bills on: compute requests, rows, FHE seconds and
//! bytes in and out, rendered on `/metrics` with a `tenant` label.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::telemetry::metrics::{Counter, Exposition};

#[derive(Default)]
pub struct TenantMeter {
    pub requests: Counter,
    pub rows: Counter,
    pub fhe_micros: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
}

/// Meters by tenant; tenants come from the configuration, so the map is bounded by it.
#[derive(Default)]
pub struct UsageMeters {
    tenants: Mutex<BTreeMap<String, Arc<TenantMeter>>>,
}

impl UsageMeters {
    pub fn tenant(&self, name: &str) -> Arc<TenantMeter> {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    pub fn render(&self, e: &mut Exposition) {
        let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let series = |f: &dyn Fn(&TenantMeter) -> f64| -> Vec<(&str, f64)> {
            tenants.iter().map(|(t, m)| (t.as_str(), f(m))).collect()
        };
        e.labelled_counter(
            "hyfhe_tenant_requests_total",
            "Compute requests answered, by tenant.",
            "tenant",
            &series(&|m| m.requests.get() as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_rows_total",
            "Encrypted rows evaluated, by tenant.",
            "tenant",
            &series(&|m| m.rows.get() as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_fhe_seconds_total",
            "Worker FHE evaluation time, by tenant.",
            "tenant",
            &series(&|m| m.fhe_micros.get() as f64 / 1e6),
        );
        e.labelled_counter(
            "hyfhe_tenant_bytes_in_total",
            "Compute request bytes received, by tenant.",
            "tenant",
            &series(&|m| m.bytes_in.get() as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_bytes_out_total",
            "Compute response bytes sent, by tenant.",
            "tenant",
            &series(&|m| m.bytes_out.get() as f64),
        );
    }
}
