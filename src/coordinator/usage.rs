//! Per-tenant usage, what a SaaS operator bills on, rendered on `/metrics` with a `tenant` label:
//! compute requests and bytes in and out as this coordinator served them, and rows, jobs and FHE
//! seconds from the store's bill ([`TenantBill`]), which the worker adds to in the step that
//! stores a job's outcome, once per job, whoever asked and whether or not they waited. The billed
//! series are cluster-wide: every coordinator shows the same values (take one, not the sum).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::queue::TenantBill;
use crate::telemetry::metrics::{Counter, Exposition};

#[derive(Default)]
pub struct TenantMeter {
    pub requests: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    /// Requests refused on the tenant's row budget.
    pub row_budget_refusals: Counter,
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

    /// This coordinator's counters, and `bills` (tenant → its bill in the store).
    pub fn render(&self, e: &mut Exposition, bills: &[(String, TenantBill)]) {
        let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let series = |f: &dyn Fn(&TenantMeter) -> f64| -> Vec<(&str, f64)> {
            tenants.iter().map(|(t, m)| (t.as_str(), f(m))).collect()
        };
        let billed = |f: &dyn Fn(&TenantBill) -> f64| -> Vec<(&str, f64)> {
            bills.iter().map(|(t, b)| (t.as_str(), f(b))).collect()
        };
        e.labelled_counter(
            "hyfhe_tenant_requests_total",
            "Compute requests answered, by tenant.",
            "tenant",
            &series(&|m| m.requests.get() as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_jobs_total",
            "Jobs completed and billed (once per job, cluster-wide), by tenant.",
            "tenant",
            &billed(&|b| b.jobs as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_rows_total",
            "Encrypted rows evaluated and billed (once per job, cluster-wide), by tenant.",
            "tenant",
            &billed(&|b| b.rows as f64),
        );
        e.labelled_counter(
            "hyfhe_tenant_fhe_seconds_total",
            "Worker FHE evaluation time billed (once per job, cluster-wide), by tenant.",
            "tenant",
            &billed(&|b| b.fhe_micros as f64 / 1e6),
        );
        e.labelled_counter(
            "hyfhe_tenant_row_budget_refusals_total",
            "Compute requests refused with row_budget_exceeded, by tenant.",
            "tenant",
            &series(&|m| m.row_budget_refusals.get() as f64),
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
