pub mod protocol;

/// The shim runtime (the `agent-shim` binary); not built for protocol-only dependents.
#[cfg(feature = "shim")]
pub mod shim;
