//! An error with all its causes on one line, for logs and the command line: a wrapper's message
//! alone ("client error (Connect)") hides what went wrong ("Connection refused").

/// `e` and its sources joined by ": ", skipping a cause whose text the message already ends with
/// (thiserror's transparent and `#[from]` wrappers often repeat their source).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(thiserror::Error, Debug)]
    enum Outer {
        #[error("fetching")]
        Wrapped(#[source] std::io::Error),
        #[error("fetching: {0}")]
        Repeating(#[source] std::io::Error),
    }

    #[test]
    fn every_cause_appears_once() {
        let refused = || std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(
            chain(&Outer::Wrapped(refused())),
            "fetching: Connection refused (os error 111)"
        );
        assert_eq!(
            chain(&Outer::Repeating(refused())),
            "fetching: Connection refused (os error 111)"
        );
    }
}
