//! End-to-end tests live in `tests/`; shared fixtures in `stack`.
pub mod chart;
pub mod in_cluster;
pub mod lifecycle;
pub mod registry;
pub mod sso;
pub mod stack;
pub mod vm;
