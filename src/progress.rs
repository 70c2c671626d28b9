//! Progress hooks, so the CLI can draw bars without the library knowing about terminals.

pub trait Progress: Sync {
    /// A new stage of `total` steps begins.
    fn stage(&self, name: &str, total: usize);
    fn advance(&self, n: usize);
}

/// For callers that want no progress output (tests, services).
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _: &str, _: usize) {}
    fn advance(&self, _: usize) {}
}
