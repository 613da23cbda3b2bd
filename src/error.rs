//! The library's error type. Messages say what went wrong and, where possible, what to do.

use std::path::PathBuf;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor shapes that do not fit together (a bug in the caller or a bad config).
    #[error("shape error: {0}")]
    Shape(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data file whose contents are not what its format says (wrong magic, truncated, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// An invalid configuration value or command-line flag.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A device (GPU, driver, library) problem.
    #[error("device error: {0}")]
    Device(String),
    /// A NaN or Inf where finite numbers are required.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// This rank of a data-parallel run stops because another rank failed, exited or hung (the
    /// message names it); the launcher reports the rank that failed first, not this one.
    #[error("{0}")]
    Peer(String),
    /// Anything else, with a message that says what to do.
    #[error("{0}")]
    Msg(String),
}

/// The exit status of a rank that stops because of another rank ([`Error::Peer`]), which the
/// launcher tells apart from the failure that caused it.
pub const PEER_EXIT_CODE: u8 = 3;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

/// `bail!(Variant, "fmt", args)` returns early with `Error::Variant(format!(...))`.
#[macro_export]
macro_rules! bail {
    ($variant:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$variant(format!($($arg)*)))
    };
}
