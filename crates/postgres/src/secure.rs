//! The secure side of [`crate::connect`]: the password from a file, TLS
//! files checked before connecting, and one clear line for a connection
//! the server or the TLS layer refused (docs/SECURITY.md).

use std::path::Path;

use custody_core::{Error, Secret};
use sqlx::postgres::PgConnectOptions;

/// Environment variable naming a file that holds the PostgreSQL password,
/// used when the URL carries none (e.g. a mounted Kubernetes or Docker
/// secret). It sits beside the variables sqlx itself reads at the same
/// point (`PGPASSWORD`, `PGPASSFILE`, `~/.pgpass`), and takes precedence
/// over them. The URL's own password wins over all.
pub const PASSWORD_FILE_ENV: &str = "CUSTODY_DB_PASSWORD_FILE";

/// Apply [`PASSWORD_FILE_ENV`] when `url` has no password, and check that
/// the TLS files the URL names exist, so a typo is named before connecting.
pub(crate) fn prepare(
    url: &str,
    shown: &str,
    mut options: PgConnectOptions,
) -> custody_core::Result<PgConnectOptions> {
    let has_password = custody_core::redact_url(url) != url;
    if !has_password {
        if let Some(file) = std::env::var_os(PASSWORD_FILE_ENV) {
            let password = Secret::from_file(PASSWORD_FILE_ENV, Path::new(&file))?;
            options = options.password(password.expose());
        }
    }
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    for (key, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        let tls_file = matches!(
            key,
            "sslrootcert"
                | "ssl-root-cert"
                | "ssl-ca"
                | "sslcert"
                | "ssl-cert"
                | "sslkey"
                | "ssl-key"
        );
        if tls_file && !Path::new(value).is_file() {
            return Err(Error::Config(format!(
                "PostgreSQL {shown}: {key}={value} is not a readable file; give the path of the PEM file"
            )));
        }
    }
    Ok(options)
}

/// A connection the server or TLS refused: wrong password, no pg_hba.conf
/// entry (e.g. only `hostssl` lines and a plaintext client), a certificate
/// that does not verify. `None` for other failures (server down, …), which
/// keep the generic message. Such a refusal is terminal: retrying with the
/// same settings cannot succeed.
pub(crate) fn refused(shown: &str, e: &sqlx::Error) -> Option<Refused> {
    let what = match e {
        sqlx::Error::Database(db) => {
            let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
            match pg.code() {
                // invalid_password
                "28P01" => format!(
                    "the server refused the password ({}); give the right one in the URL, in the file named by {PASSWORD_FILE_ENV}, in PGPASSWORD or in ~/.pgpass",
                    pg.message()
                ),
                // invalid_authorization_specification: no pg_hba.conf entry
                // 28000 is also "role does not exist": only a pg_hba refusal is about TLS
                "28000" if pg.message().contains("pg_hba.conf") => format!(
                    "the server does not accept this connection ({}); if it only accepts TLS (hostssl in pg_hba.conf), add sslmode=verify-full&sslrootcert=<CA file> to the URL, else ask for a pg_hba.conf entry for this user, database and address",
                    pg.message()
                ),
                _ => return None,
            }
        }
        sqlx::Error::Tls(inner) => format!(
            "TLS was required but not set up: {inner}; the server must have ssl = on, or the URL's sslmode must not require TLS"
        ),
        sqlx::Error::Configuration(inner) => {
            format!("the connection settings are wrong: {inner}; check sslcert and sslkey (both or neither)")
        }
        sqlx::Error::Io(io) => {
            let tls = io.get_ref()?.downcast_ref::<rustls::Error>()?;
            tls_hint(tls)
        }
        _ => return None,
    };
    Some(Refused(format!("PostgreSQL {shown}: {what}")))
}

fn tls_hint(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the server's TLS certificate is not signed by a trusted CA ({e}); set sslrootcert=<file> in the URL to the CA certificate that signed it"
        ),
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's TLS certificate does not name this host ({e}); connect with a host name the certificate lists, or use sslmode=verify-ca"
        ),
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        ) => format!("the server's TLS certificate is outside its validity period ({e}); renew it on the server (or check this machine's clock)"),
        other => format!(
            "the TLS handshake failed ({other}); check sslrootcert, sslcert and sslkey in the URL and the server's ssl settings"
        ),
    }
}

/// The text of a refused connection (see [`refused`]); the driver's error
/// is part of it, so it is not kept again as a source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(String);
