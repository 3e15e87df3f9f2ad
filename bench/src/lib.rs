//! Shared helpers for the DMQ benchmarks.
