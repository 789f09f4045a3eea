//! Test support shared by every crate's tests: where the fixtures are, and how floats are
//! compared against goldens (STYLE.md §7). Not used outside tests.

use std::path::PathBuf;

/// Root of the test fixtures: `$SD_FIXTURES` when set, else `tests/fixtures` in this
/// repository (copied from `../shared/fixtures`, see `tests/fixtures/README.md`).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("SD_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"),
    }
}

/// Path of one fixture, relative to [`fixtures_dir`].
///
/// # Panics
/// When the fixture is missing, naming the full path (a test that cannot find its data fails;
/// it never passes vacuously).
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(
        p.exists(),
        "missing test fixture {} (set SD_FIXTURES to override the fixture root)",
        p.display()
    );
    p
}

/// Asserts `|actual - expected| <= atol + rtol * |expected|` elementwise.
///
/// # Panics
/// On a length mismatch or the first failing comparison, reporting `what`, the worst index,
/// both values and the largest absolute error, so a failure says where and by how much.
pub fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: length {} != expected {}",
        actual.len(),
        expected.len()
    );
    let mut worst = (0usize, 0f32, 0f32); // index, excess over tolerance, abs error
    let mut max_abs = 0f32;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let err = (a - e).abs();
        let same_non_finite = a == e || (a.is_nan() && e.is_nan());
        assert!(
            err.is_finite() || same_non_finite,
            "{what}: non-finite mismatch at index {i}: actual {a}, expected {e}"
        );
        if err.is_finite() {
            max_abs = max_abs.max(err);
            let excess = err - (atol + rtol * e.abs());
            if excess > worst.1 {
                worst = (i, excess, err);
            }
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: not close at index {i}: actual {}, expected {}, abs error {} (atol {atol}, rtol {rtol}); max abs error {max_abs}",
            actual[i], expected[i], worst.2
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_values_pass() {
        assert_close("x", &[1.0, 2.0], &[1.0 + 1e-7, 2.0], 1e-6, 0.0);
    }

    #[test]
    #[should_panic(expected = "not close at index 1")]
    fn far_values_fail_with_index() {
        assert_close("x", &[1.0, 2.5], &[1.0, 2.0], 1e-3, 1e-3);
    }

    #[test]
    fn fixtures_are_found() {
        assert!(fixture("README.md").is_file());
    }
}
