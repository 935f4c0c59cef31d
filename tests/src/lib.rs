//! End-to-end tests of shoal live in `tests/tests/`; this crate has no library code.
