//! Validation of the names users choose: app names, config var keys, domains, digests.

/// Longest app name: a DNS label is at most 63 bytes, and apps are served at `<app>.<domain>`.
pub const MAX_APP_NAME_LEN: usize = 63;
/// Longest config var key; generous for any real environment variable.
pub const MAX_CONFIG_KEY_LEN: usize = 128;
/// Longest domain name (RFC 1035).
pub const MAX_DOMAIN_LEN: usize = 253;

/// Checks an app name: a lowercase DNS label (`a-z`, `0-9`, `-`, not starting or ending with `-`).
/// Returns what is wrong, phrased as what to fix.
pub fn check_app_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty; use a lowercase DNS label such as \"hello\"".into());
    }
    if name.len() > MAX_APP_NAME_LEN {
        return Err(format!("must be at most {MAX_APP_NAME_LEN} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "{name:?} may contain only lowercase letters, digits and '-' (it becomes a host name)"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{name:?} must not start or end with '-'"));
    }
    Ok(())
}

/// Names Platform.X sets for every instance; users may not override them.
pub const RESERVED_ENV_KEYS: &[&str] = &["PORT", "PX_APP", "PX_RELEASE"];

/// Checks a config var key: an environment variable name, not one the platform reserves.
pub fn check_config_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_CONFIG_KEY_LEN {
        return Err(format!("must be 1 to {MAX_CONFIG_KEY_LEN} characters"));
    }
    let mut bytes = key.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_');
    if !first_ok || !bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(format!(
            "{key:?} is not an environment variable name (letters, digits and '_', not starting with a digit)"
        ));
    }
    if RESERVED_ENV_KEYS.contains(&key) || key.starts_with("PX_") {
        return Err(format!(
            "{key:?} is set by Platform.X itself; choose another name"
        ));
    }
    Ok(())
}

/// Checks a host name such as `hello.example.com` (letters, digits, '-' and dots).
pub fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
        return Err(format!(
            "{domain:?} must be 1 to {MAX_DOMAIN_LEN} characters"
        ));
    }
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!(
                "{domain:?} is not a valid lowercase host name (dot-separated labels of a-z, 0-9, '-')"
            ));
        }
    }
    Ok(())
}

/// Checks that a string is a lowercase hex SHA-256 digest (64 characters).
pub fn check_sha256_hex(digest: &str) -> Result<(), String> {
    if digest.len() == 64
        && digest
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(format!(
            "{digest:?} is not a SHA-256 digest (64 lowercase hex characters)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names() {
        for good in ["a", "hello", "my-app-2", &"x".repeat(63)] {
            assert!(check_app_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Hello", "-a", "a-", "a_b", "a.b", "ä", &"x".repeat(64)] {
            assert!(check_app_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_keys() {
        assert!(check_config_key("DATABASE_URL").is_ok());
        assert!(check_config_key("_x1").is_ok());
        for bad in ["", "1A", "A-B", "PORT", "PX_APP", "PX_ANYTHING", "A B"] {
            assert!(check_config_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains() {
        assert!(check_domain("hello.example.com").is_ok());
        assert!(check_domain("hello.localhost").is_ok());
        for bad in ["", "a..b", "-a.com", "A.com", "a_b.com", "a.com."] {
            assert!(check_domain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests() {
        assert!(check_sha256_hex(&"ab".repeat(32)).is_ok());
        assert!(check_sha256_hex(&"AB".repeat(32)).is_err());
        assert!(check_sha256_hex("abc").is_err());
    }
}
