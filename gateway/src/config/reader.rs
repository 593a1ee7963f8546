//! Reading the merged tree key by key: typed values, ranges, addresses, the store's backend,
//! and every unknown or bad key collected (not only the first), with secrets never shown.

use super::*;

/// Reads typed keys out of the merged tree and records what is wrong with them.
pub(super) struct Reader<'a> {
    pub(super) merged: &'a config::Config,
    pub(super) seen: BTreeSet<&'static str>,
    pub(super) bad: Vec<InvalidKey>,
}

impl Reader<'_> {
    pub(super) fn shown(&self, key: &str) -> String {
        if key == "store.postgres_url" {
            // Absent: nothing to show.
            return self
                .merged
                .get::<String>(key)
                .map(|url| crate::store::redact_url(&url))
                .unwrap_or_default();
        }
        if SECRET_KEYS.contains(&key) {
            return "<redacted>".to_owned();
        }
        match self.merged.get::<config::Value>(key) {
            Ok(value) => show(&value),
            Err(_) => String::new(),
        }
    }

    /// Records `reason` for `key` when its (present) value fails `ok`.
    pub(super) fn ensure<T>(
        &mut self,
        key: &str,
        value: &Option<T>,
        ok: impl Fn(&T) -> bool,
        reason: &str,
    ) {
        if value.as_ref().is_some_and(|v| !ok(v)) {
            self.reject::<()>(key, reason);
        }
    }

    pub(super) fn reject<T>(&mut self, key: &str, reason: &str) -> Option<T> {
        // serde's messages quote the value ("invalid type: string \"…\""): not for secrets.
        let reason = if SECRET_KEYS.contains(&key) && reason.contains('"') {
            "has the wrong type"
        } else {
            reason
        };
        self.bad.push(InvalidKey {
            key: key.to_owned(),
            value: self.shown(key),
            reason: reason.to_owned(),
        });
        None
    }

    /// `Some(None)` when absent, `None` when present but invalid.
    pub(super) fn optional<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<Option<T>> {
        self.seen.insert(key);
        match self.merged.get::<config::Value>(key) {
            Err(config::ConfigError::NotFound(_)) => Some(None),
            Err(e) => self.reject(key, &e.to_string()),
            Ok(_) => match self.merged.get::<T>(key) {
                Ok(v) => Some(Some(v)),
                Err(e) => self.reject(key, &strip_key(&e.to_string())),
            },
        }
    }

    pub(super) fn required<T: DeserializeOwned>(&mut self, key: &'static str) -> Option<T> {
        match self.optional(key)? {
            Some(v) => Some(v),
            None => self.reject(key, "is required"),
        }
    }

    pub(super) fn addr(&mut self, key: &'static str) -> Option<SocketAddr> {
        let text: String = self.required(key)?;
        self.parse_addr(key, &text)
    }

    pub(super) fn optional_addr(&mut self, key: &'static str) -> Option<Option<SocketAddr>> {
        match self.optional::<String>(key)? {
            None => Some(None),
            Some(text) => self.parse_addr(key, &text).map(Some),
        }
    }

    pub(super) fn parse_addr(&mut self, key: &str, text: &str) -> Option<SocketAddr> {
        match text.parse() {
            Ok(addr) => Some(addr),
            Err(_) => self.reject(
                key,
                "not a socket address like 127.0.0.1:8080 or [::1]:8080",
            ),
        }
    }

    pub(super) fn in_range<T>(&mut self, key: &'static str, min: T, max: T) -> Option<T>
    where
        T: DeserializeOwned + PartialOrd + fmt::Display + Copy,
    {
        let v: T = self.required(key)?;
        if v < min || v > max {
            return self.reject(key, &format!("must be between {min} and {max}"));
        }
        Some(v)
    }

    /// `store.backend` and, for `postgres`, the `store.postgres_url` it needs and the
    /// `store.postgres_ca_file`, `store.postgres_cert_file` and `store.postgres_key_file` it
    /// may have.
    pub(super) fn store_backend(&mut self) -> Option<crate::store::Backend> {
        let ca_file = self.optional::<PathBuf>("store.postgres_ca_file");
        let cert_file = self.optional::<PathBuf>("store.postgres_cert_file");
        let key_file = self.optional::<PathBuf>("store.postgres_key_file");
        let name: String = self.required("store.backend")?;
        let url = self.optional::<String>("store.postgres_url")?;
        match (name.as_str(), url) {
            ("redb", _) => Some(crate::store::Backend::Redb),
            ("postgres", None) => self.reject(
                "store.postgres_url",
                "is required with store.backend = postgres (a URL like postgres://posgate:PASSWORD@db.example:5432/posgate)",
            ),
            ("postgres", Some(url)) if url.parse::<postgres::Config>().is_err() => {
                let why = url
                    .parse::<postgres::Config>()
                    .err()
                    .and_then(|e| std::error::Error::source(&e).map(|s| s.to_string()))
                    .unwrap_or_default();
                // Only option names from the error: the URL may carry a password.
                let reason = if why.contains("`sslmode`") {
                    "sslmode must be disable, prefer or require (for libpq's verify-ca or \
                     verify-full: sslmode=require and store.postgres_ca_file)"
                } else if ["sslrootcert", "sslcert", "sslkey", "sslcrl", "sslpassword"]
                    .iter()
                    .any(|o| why.contains(&format!("`{o}`")))
                {
                    "the ssl file options of libpq are not read from the URL: set the server's CA \
                     in store.postgres_ca_file, a client certificate and its key in \
                     store.postgres_cert_file and store.postgres_key_file"
                } else {
                    "is not a PostgreSQL connection URL (postgres://user:password@host:port/database)"
                };
                self.reject("store.postgres_url", reason)
            }
            ("postgres", Some(url)) => {
                let tls = self.postgres_tls(&url, ca_file?, cert_file?, key_file?)?;
                Some(crate::store::Backend::Postgres { url, tls })
            }
            _ => self.reject("store.backend", "must be \"redb\" or \"postgres\""),
        }
    }

    /// `store.postgres_ca_file` and the client certificate of `store.postgres_cert_file` and
    /// `store.postgres_key_file` (both or neither), read and checked now (a bad file is a
    /// configuration error, exit 64). Each needs `sslmode=require`: with `prefer` a server, or
    /// whoever sits in between, can decline TLS, which skips the verification and the client
    /// certificate alike.
    pub(super) fn postgres_tls(
        &mut self,
        url: &str,
        ca_file: Option<PathBuf>,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Option<crate::store::PgTls> {
        let require =
            crate::store::pg_ssl_mode(url) == Some(tokio_postgres::config::SslMode::Require);
        let mut refused = false;
        let client = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                refused = true;
                self.reject::<()>(
                    "store.postgres_key_file",
                    "is required with store.postgres_cert_file (the private key of that client \
                     certificate)",
                );
                None
            }
            (None, Some(_)) => {
                refused = true;
                self.reject::<()>(
                    "store.postgres_cert_file",
                    "is required with store.postgres_key_file (the client certificate of that key)",
                );
                None
            }
        };
        if ca_file.is_some() && !require {
            refused = true;
            self.reject::<()>(
                "store.postgres_ca_file",
                "needs sslmode=require in store.postgres_url: with prefer (the default) a server, \
                 or whoever sits in between, can decline TLS and the connection goes on in clear",
            );
        }
        if client.is_some() && !require {
            refused = true;
            self.reject::<()>(
                "store.postgres_cert_file",
                "needs sslmode=require in store.postgres_url: with prefer (the default) a server, \
                 or whoever sits in between, can decline TLS and the connection goes on in clear, \
                 the client certificate never presented",
            );
        }
        if refused {
            return None;
        }
        let client = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        match crate::store::PgTls::from_files(ca_file.as_deref(), client) {
            Ok(tls) => Some(tls),
            Err(errors) => {
                for e in errors {
                    self.reject::<()>(e.key(), &e.to_string());
                }
                None
            }
        }
    }

    /// Records every leaf key of the merged tree that no reader asked for.
    pub(super) fn unknown_keys(&mut self) {
        let mut leaves = Vec::new();
        if let config::ValueKind::Table(root) = &self.merged.cache.kind {
            collect_leaves("", root, &mut leaves);
        }
        for (key, _) in leaves {
            let known_section = self.seen.iter().any(|k| k.starts_with(&format!("{key}.")));
            if !self.seen.contains(key.as_str()) && !known_section {
                // Its value is never shown: an unknown key may be a mistyped secret
                // (`provider.api_keys = "sk_live_…"`).
                self.bad.push(InvalidKey {
                    key,
                    value: "<not shown>".to_owned(),
                    reason: "unknown key".to_owned(),
                });
            }
        }
    }
}

pub(super) fn collect_leaves(
    prefix: &str,
    table: &config::Map<String, config::Value>,
    out: &mut Vec<(String, String)>,
) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match &value.kind {
            config::ValueKind::Table(inner) if !inner.is_empty() => {
                collect_leaves(&key, inner, out)
            }
            _ => out.push((key, show(value))),
        }
    }
}

/// What is wrong with a CORS origin, if anything. A browser sends `Origin` as
/// `scheme://host[:port]`, lowercase, with no path, and the comparison is exact, so anything else
/// would never match: better an error at start than a page that silently fails.
pub(super) fn origin_problem(origin: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return Some("must be scheme://host[:port], e.g. https://pos.example");
    };
    if scheme != "http" && scheme != "https" {
        return Some("the scheme must be http or https");
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', '*']) {
        return Some("must be scheme://host[:port]: no path (not even a trailing /), no wildcard");
    }
    if !rest
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:[]".contains(c))
    {
        return Some("the host must be written as a browser sends it: lowercase ASCII (punycode)");
    }
    None
}

/// `POSGATE__PROVIDER__WEBHOOK_SECRETS` → `provider.webhook_secrets`.
pub(super) fn env_key(name: &str) -> String {
    name.to_lowercase()
        .trim_start_matches("posgate__")
        .replace("__", ".")
}

fn show(value: &config::Value) -> String {
    match &value.kind {
        config::ValueKind::String(s) => format!("{s:?}"),
        config::ValueKind::Array(items) => {
            format!(
                "[{}]",
                items.iter().map(show).collect::<Vec<_>>().join(", ")
            )
        }
        config::ValueKind::Table(_) => "{…}".to_owned(),
        _ => value.to_string(),
    }
}

/// serde errors from `config` repeat the key ("invalid type … for key `x`"); keep the reason.
fn strip_key(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}
