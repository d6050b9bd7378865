//! Errors written out for people: an error followed by the errors that caused it.

/// An error with its causes, joined with ": ", e.g. `error sending request: client error
/// (Connect): tcp connect error: Connection refused`. Many libraries' own messages (reqwest's,
/// hyper's) say only what failed, and their sources say why.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot deliver the alert")]
    struct Delivery(#[source] Connect);

    #[derive(Debug, thiserror::Error)]
    #[error("tcp connect error")]
    struct Connect(#[source] std::io::Error);

    #[test]
    fn an_error_is_followed_by_each_of_its_causes() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(
            error_chain(&Delivery(Connect(refused))),
            "cannot deliver the alert: tcp connect error: refused"
        );
        assert_eq!(
            error_chain(&std::fmt::Error),
            "an error occurred when formatting an argument"
        );
    }
}
