//! Labels Kubernetes users and tools know, set wherever we set labels.

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const PART_OF: &str = "app.kubernetes.io/part-of";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const VERSION: &str = "app.kubernetes.io/version";

/// `app.kubernetes.io/part-of` of everything the platform creates.
pub const PLATFORM: &str = "harmony-iot";
