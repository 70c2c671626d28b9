//! The coordinator's actors, one file each.

pub mod dispatcher;
pub mod result_router;
pub mod session_registry;

pub use dispatcher::{Dispatch, Dispatched, Dispatcher, RowBudget};
pub use result_router::ResultRouter;
pub use session_registry::{over_quota, Authorize, CreateSession, DeleteSession, SessionRegistry};
