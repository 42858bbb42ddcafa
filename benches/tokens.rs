//! Placeholder replaced by the token benchmarks.
fn main() {}
