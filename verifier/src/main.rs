//! `attestplane-verify`: placeholder.
fn main() {}
