//! The lab's error type: what failed, with the steps that led there as context.

/// A lab operation failed. `Display` shows the outermost step; the steps below it are
/// the [`source`](std::error::Error::source) chain (printed by `{:#}` through anyhow).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call, file or socket operation failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A system call made through nix failed.
    #[error(transparent)]
    Errno(#[from] nix::errno::Errno),
    /// JSON could not be read or written.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// YAML could not be written.
    #[error(transparent)]
    Yaml(#[from] serde_norway::Error),
    /// The lab was asked for something it cannot do or found something it did not
    /// expect (no such pod, too many nodes, an `ip` command failed, a timeout, ...).
    #[error("{0}")]
    Failed(String),
    /// A step failed because of `source`.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<Error>,
    },
}

/// `Result` with the lab's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the step that was being taken to an error (like anyhow's `Context`).
pub(crate) trait Context<T> {
    fn context(self, context: impl Into<String>) -> Result<T>;
    fn with_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.into(),
            source: Box::new(e.into()),
        })
    }

    fn with_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context().into(),
            source: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, context: impl Into<String>) -> Result<T> {
        self.ok_or_else(|| Error::Failed(context.into()))
    }

    fn with_context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.ok_or_else(|| Error::Failed(context().into()))
    }
}

/// Returns early with [`Error::Failed`] and a formatted message (like anyhow's `bail!`).
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Failed(format!($($arg)*)))
    };
}
pub(crate) use bail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_names_the_step_and_keeps_the_cause_as_source() {
        let e = std::fs::read("/nonexistent/netpol-lab")
            .context("reading the lab's file")
            .unwrap_err();
        assert_eq!(e.to_string(), "reading the lab's file");
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.to_string().contains("No such file"), "{source}");
    }
}
