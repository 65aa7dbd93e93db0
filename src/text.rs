//! Echoing untrusted text back safely: bounded in length, and with control
//! characters escaped so nothing a container sends can drive a terminal;
//! and reading small text files (configuration, tokens) with a bound.

/// The text of `path`, a regular file of at most `max` bytes: a symlink to
/// a device (`/dev/zero`), a FIFO or a huge file is refused before it is
/// read into memory.
pub fn read_small_file(path: &std::path::Path, max: u64) -> std::io::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text)?;
    if text.len() as u64 > max {
        return Err(std::io::Error::other(format!("larger than {max} bytes")));
    }
    Ok(text)
}

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
mod file_tests {
    use super::read_small_file;

    #[test]
    fn devices_and_big_files_are_refused_small_ones_read() {
        let e = read_small_file(std::path::Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = std::env::temp_dir().join(format!("porthole-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, "x".repeat(100)).unwrap();
        assert_eq!(read_small_file(&f, 100).unwrap().len(), 100);
        let e = read_small_file(&f, 99).unwrap_err();
        assert!(e.to_string().contains("larger than 99 bytes"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
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
