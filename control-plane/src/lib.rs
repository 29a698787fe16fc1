//! The `codebolt` control plane: configuration, tools, the HTTP API server and the CLI client.

pub mod bundle;
pub mod config;
pub mod prometheus;
pub mod server;
pub mod telemetry;
pub mod tools;
