//! Configuration files (SPEC §3).
