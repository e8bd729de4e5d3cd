//! Connecting to NATS with authentication and TLS ([`ConnectOptions`],
//! [`connect_with`]); docs/SECURITY.md.

use std::path::PathBuf;

use custody_core::{redact_url, Error, Result, Secret};
use serde::{Deserialize, Serialize};

use crate::NatsError;

/// How custody authenticates to NATS and secures the link: the `[nats]`
/// section of the `custody` config (keys in kebab-case). Every field is
/// optional; the default is an anonymous connection that uses TLS when the
/// server asks for it.
///
/// Secrets are never inline: they are read from the files (or the
/// environment variables) named here, when connecting. At most one way to
/// authenticate may be given: `creds-file`, `nkey-file`, a token
/// (`token-file` or `token-env`), or `user` with a password
/// (`password-file` or `password-env`). Credentials in the URL
/// (`nats://user:password@host`) also work, but then the secret sits in the
/// URL; prefer the files.
///
/// Any `tls-*` file, `require-tls = true` or a `tls://` URL makes TLS
/// required: a server that does not offer it is refused. The server's
/// certificate is always verified, against `tls-ca-file` when given (else
/// the WebPKI roots).
///
/// ```
/// let opts: custody_nats::ConnectOptions = serde_json::from_str(
///     r#"{"user": "relay", "password-file": "/run/secrets/nats", "tls-ca-file": "/etc/custody/ca.pem"}"#,
/// ).unwrap();
/// assert!(opts.tls_required());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConnectOptions {
    /// A `.creds` file (user JWT + NKey seed), as issued by `nsc`.
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU…`).
    pub nkey_file: Option<PathBuf>,
    /// A file holding the authentication token.
    pub token_file: Option<PathBuf>,
    /// The name of an environment variable holding the token.
    pub token_env: Option<String>,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// A file holding the password of `user`.
    pub password_file: Option<PathBuf>,
    /// The name of an environment variable holding the password of `user`.
    pub password_env: Option<String>,
    /// PEM file of the CA(s) that sign the server's certificate.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (mutual TLS).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls-cert-file`.
    pub tls_key_file: Option<PathBuf>,
    /// Refuse a server that does not offer TLS.
    pub require_tls: bool,
}

impl ConnectOptions {
    /// Whether TLS is required: `require-tls`, or any `tls-*` file given.
    pub fn tls_required(&self) -> bool {
        self.require_tls
            || self.tls_ca_file.is_some()
            || self.tls_cert_file.is_some()
            || self.tls_key_file.is_some()
    }

    /// Whether any way to authenticate is set.
    fn has_auth(&self) -> bool {
        self.creds_file.is_some()
            || self.nkey_file.is_some()
            || self.token_file.is_some()
            || self.token_env.is_some()
            || self.user.is_some()
    }

    /// Check the combination of settings (not the files): one way to
    /// authenticate, `user` with a password, a client certificate with its
    /// key. The error names the keys.
    pub fn validate(&self) -> Result<()> {
        let methods: Vec<&str> = [
            (self.creds_file.is_some(), "creds-file"),
            (self.nkey_file.is_some(), "nkey-file"),
            (self.token_file.is_some(), "token-file"),
            (self.token_env.is_some(), "token-env"),
            (self.user.is_some(), "user"),
        ]
        .into_iter()
        .filter_map(|(set, key)| set.then_some(key))
        .collect();
        if methods.len() > 1 {
            return Err(Error::Config(format!(
                "nats: {} are set; give only one way to authenticate",
                methods.join(" and ")
            )));
        }
        match (
            self.user.is_some(),
            self.password_file.is_some(),
            self.password_env.is_some(),
        ) {
            (true, false, false) => {
                return Err(Error::Config(
                    "nats.user is set without a password; set nats.password-file (or nats.password-env)".to_owned(),
                ))
            }
            (true, true, true) => {
                return Err(Error::Config(
                    "nats.password-file and nats.password-env are both set; keep one".to_owned(),
                ))
            }
            (false, true, _) | (false, _, true) => {
                return Err(Error::Config(
                    "nats.password-file / nats.password-env is set without nats.user; set the user name too".to_owned(),
                ))
            }
            _ => {}
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(Error::Config(
                "nats.tls-cert-file and nats.tls-key-file go together; set both for a client certificate, or neither".to_owned(),
            ));
        }
        for (key, file) in [
            ("nats.tls-ca-file", &self.tls_ca_file),
            ("nats.tls-cert-file", &self.tls_cert_file),
            ("nats.tls-key-file", &self.tls_key_file),
            ("nats.creds-file", &self.creds_file),
        ] {
            if let Some(file) = file {
                if !file.is_file() {
                    return Err(Error::Config(format!(
                        "{key} {}: not a readable file; give the path of an existing file",
                        file.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The client options: secrets read now from their files or variables.
    async fn client_options(&self, shown: &str) -> Result<async_nats::ConnectOptions> {
        self.validate()?;
        let mut opts = async_nats::ConnectOptions::new().name("custody");
        if let Some(file) = &self.creds_file {
            opts = opts.credentials_file(file).await.map_err(|e| {
                Error::Config(format!(
                    "nats.creds-file {}: not a usable .creds file ({e}); give the file nsc generated for this user",
                    file.display()
                ))
            })?;
        }
        if let Some(file) = &self.nkey_file {
            let seed = Secret::from_file("nats.nkey-file", file)?;
            opts = opts.nkey(seed.expose().trim().to_owned());
        }
        let token = match (&self.token_file, &self.token_env) {
            (Some(file), _) => Some(Secret::from_file("nats.token-file", file)?),
            (None, Some(var)) => Some(Secret::from_env("nats.token-env", var)?),
            (None, None) => None,
        };
        if let Some(token) = token {
            opts = opts.token(token.expose().to_owned());
        }
        if let Some(user) = &self.user {
            let password = match (&self.password_file, &self.password_env) {
                (Some(file), _) => Secret::from_file("nats.password-file", file)?,
                (None, Some(var)) => Secret::from_env("nats.password-env", var)?,
                (None, None) => {
                    return Err(Error::Config(
                        "nats.user is set without a password; set nats.password-file (or nats.password-env)".to_owned(),
                    ))
                }
            };
            opts = opts.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(ca) = &self.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            opts = opts.add_client_certificate(cert.clone(), key.clone());
        }
        if self.tls_required() {
            opts = opts.require_tls(true);
        }
        // After a reconnect the client keeps retrying by itself; a server
        // that now refuses the credentials must not hide behind that.
        let link = shown.to_owned();
        opts = opts.event_callback(move |event| {
            let link = link.clone();
            async move {
                // A refusal while reconnecting arrives as a client error
                // carrying the server's text, not as a ServerError.
                let refused = match &event {
                    async_nats::Event::ServerError(
                        async_nats::ServerError::AuthorizationViolation,
                    ) => true,
                    async_nats::Event::ClientError(async_nats::ClientError::Other(text)) => {
                        text.contains("authorization violation")
                    }
                    _ => false,
                };
                match event {
                    _ if refused => {
                        tracing::error!(
                            "NATS {link}: the server refused custody's credentials (authorization violation); fix the [nats] credentials or the server's authorization, the client keeps retrying"
                        )
                    }
                    async_nats::Event::ServerError(e) => tracing::warn!("NATS {link}: server error: {e}"),
                    async_nats::Event::ClientError(e) => tracing::warn!("NATS {link}: client error: {e}"),
                    other => tracing::debug!("NATS {link}: {other}"),
                }
            }
        });
        Ok(opts)
    }
}

/// Connect to the NATS server at `url` with `options` (authentication and
/// TLS, see [`ConnectOptions`]).
///
/// A server that is down, refuses the credentials or presents a certificate
/// that does not verify is an error naming the URL (without its password)
/// and what to fix; a refusal is terminal (not retryable). Once connected,
/// the client reconnects by itself after losing the server; operations
/// during the gap fail with retryable errors.
pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<async_nats::Client> {
    let shown = redact_url(url);
    let mut opts = options.client_options(&shown).await?;
    // Credentials in the URL go to the client as options, and the URL
    // without them: the client logs the server address at debug level.
    let (url, user_info) = split_user_info(url);
    if let Some((user, password)) = user_info {
        if options.has_auth() {
            return Err(Error::Config(format!(
                "NATS {shown}: the URL carries credentials and the [nats] section sets others; keep one"
            )));
        }
        opts = match password {
            Some(password) => opts.user_and_password(user, password.expose().to_owned()),
            // nats://<token>@host
            None => opts.token(user),
        };
    }
    opts.connect(url.as_str())
        .await
        .map_err(|source| NatsError::Connect { url: shown, source }.into_core("connect"))
}

/// `url` without its `user[:password]@` part, and that part: the user (or
/// token) and the password. As the client does, the parts are taken as
/// written (no percent-decoding).
fn split_user_info(url: &str) -> (String, Option<(String, Option<Secret>)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find(['/', '?', ',']).unwrap_or(rest.len());
    let Some((user_info, _)) = rest[..authority_end].rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    let without = format!("{scheme}://{}", &rest[user_info.len() + 1..]);
    let parts = match user_info.split_once(':') {
        Some((user, password)) => (user.to_owned(), Some(Secret::new(password))),
        None => (user_info.to_owned(), None),
    };
    (without, Some(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_taken_out_of_the_url() {
        let (url, info) = split_user_info("nats://relay:pw@127.0.0.1:4222");
        assert_eq!(url, "nats://127.0.0.1:4222");
        let (user, password) = info.unwrap();
        assert_eq!(user, "relay");
        assert_eq!(password.unwrap().expose(), "pw");
        let (url, info) = split_user_info("tls://tok@h:4222");
        assert_eq!(url, "tls://h:4222");
        assert_eq!(info.unwrap(), ("tok".to_owned(), None));
        assert_eq!(split_user_info("nats://h:4222").0, "nats://h:4222");
        assert_eq!(split_user_info("h:4222").0, "h:4222");
    }
}
