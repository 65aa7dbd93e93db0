//! The Prometheus text format, written the same way by both services.

use std::fmt::Write;

/// Appends one metric family: its `# HELP` and `# TYPE` lines, then a
/// sample per `(labels, value)`, where `labels` is written right after the
/// name (`""`, `{id="x"}`, or a suffix such as `_sum`).
pub fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, String)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_help_type_and_samples() {
        let mut out = String::new();
        super::family(
            &mut out,
            "x_total",
            "counter",
            "Xs.",
            &[("", "3".into()), ("{a=\"b\"}", "1".into())],
        );
        assert_eq!(
            out,
            "# HELP x_total Xs.\n# TYPE x_total counter\nx_total 3\nx_total{a=\"b\"} 1\n"
        );
    }
}
