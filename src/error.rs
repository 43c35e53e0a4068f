//! The one error type of the commands: each room's error, with its hint. `main` prints it and
//! exits 1; nothing maps errors call by call.

use crate::cli::settings::SettingsError;
use crate::prep::PrepError;
use crate::sync::SessionError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Prep(#[from] PrepError),
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Cluster(#[from] crate::kubernetes::ClusterError),
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Release(#[from] crate::kubernetes::UpError),
    #[cfg(feature = "kubernetes")]
    #[error(transparent)]
    Build(#[from] crate::kubernetes::build::BuildError),
    #[error("{message}")]
    Other { message: String, hint: Option<String> },
}

impl Error {
    /// What to do about it, when there is something to say.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::Settings(e) => e.hint(),
            Error::Session(e) => e.hint(),
            Error::Prep(e) => e.hint(),
            #[cfg(feature = "kubernetes")]
            Error::Cluster(e) => e.hint(),
            #[cfg(feature = "kubernetes")]
            Error::Release(e) => e.hint(),
            #[cfg(feature = "kubernetes")]
            Error::Build(e) => e.hint(),
            Error::Other { hint, .. } => hint.clone(),
        }
    }
}
