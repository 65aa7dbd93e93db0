//! Echoing untrusted text back safely: bounded in length, and with control
//! characters escaped so nothing a container sends can drive a terminal.

/// `s` cut to at most `max` bytes (on a character boundary), with how much
/// was left out when anything was.
pub fn clip(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len()).into()
}

/// `s` with control characters (ESC, BEL, newlines, C1 controls, ...)
/// written as escapes, safe to print on a terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_bounds_what_is_echoed() {
        assert_eq!(clip("short", 10), "short");
        let long = "x".repeat(100_000);
        let clipped = clip(&long, 100);
        assert!(clipped.len() < 200, "{clipped}");
        assert!(clipped.ends_with("(100000 bytes in all)"), "{clipped}");
        assert_eq!(clip("ééé", 3), "é… (6 bytes in all)");
    }

    #[test]
    fn printable_escapes_terminal_controls() {
        assert_eq!(printable("python3"), "python3");
        let evil = "\x1b]0;PWNED\x07\x1b[2J";
        let shown = printable(evil);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert_eq!(shown, "\\u{1b}]0;PWNED\\u{7}\\u{1b}[2J");
    }
}
