//! Why a command was refused: the expected, client-caused outcomes of validation.

/// A command that the current state does not allow, or input that breaks a rule.
///
/// Every variant names what is wrong so a client can fix it; `api` maps each variant
/// to exactly one gRPC status code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    /// A field breaks a rule (INVALID_ARGUMENT).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the field, such as `measurements[3].value`.
        field: String,
        /// The rule it breaks, lowercase, no trailing period.
        reason: String,
    },
    /// A referenced entity does not exist (NOT_FOUND).
    #[error("{field}: {what} not found")]
    NotFound {
        /// Path of the field holding the reference.
        field: String,
        /// What was looked for, such as `kpi 'revenue'`.
        what: String,
    },
    /// The entity to create exists already (ALREADY_EXISTS).
    #[error("{field}: {what} already exists")]
    AlreadyExists {
        /// Path of the field holding the id.
        field: String,
        /// What exists, such as `kpi 'revenue'`.
        what: String,
    },
    /// The state does not allow the command, such as recording to a retired KPI
    /// (FAILED_PRECONDITION).
    #[error("{field}: {reason}")]
    FailedPrecondition {
        /// Path of the field the precondition is about.
        field: String,
        /// What stands in the way.
        reason: String,
    },
    /// A position outside what exists yet, such as an as-of seq beyond the log's head
    /// (OUT_OF_RANGE): the same request can succeed later.
    #[error("{field}: {reason}")]
    OutOfRange {
        /// Path of the field holding the position.
        field: String,
        /// Where the range ends now.
        reason: String,
    },
    /// Derived state the answer needs cannot be read now and is being rebuilt from the log
    /// (UNAVAILABLE): the same request succeeds when it is retried.
    #[error("{field}: {reason}")]
    Unavailable {
        /// Path of the field naming what the state is about.
        field: String,
        /// What cannot be read, and why.
        reason: String,
    },
    /// A limit of the service would be passed (RESOURCE_EXHAUSTED).
    #[error("{field}: {reason}")]
    ResourceExhausted {
        /// Path of the field that would pass it.
        field: String,
        /// Which limit.
        reason: String,
    },
    /// Optimistic concurrency: the client's expected version is not the current one (ABORTED).
    #[error("expected_version: {what} is at version {current}, not {expected}")]
    VersionMismatch {
        /// What was to be changed, such as `kpi 'revenue'`.
        what: String,
        /// The version the client expected.
        expected: u64,
        /// The version it has now.
        current: u64,
    },
}

impl Rejection {
    /// An INVALID_ARGUMENT rejection.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A FAILED_PRECONDITION rejection.
    pub fn precondition(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::FailedPrecondition {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A NOT_FOUND rejection.
    pub fn not_found(field: impl Into<String>, what: impl Into<String>) -> Self {
        Self::NotFound {
            field: field.into(),
            what: what.into(),
        }
    }

    /// An OUT_OF_RANGE rejection.
    pub fn out_of_range(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::OutOfRange {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The field the rejection is about, when it names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::InvalidArgument { field, .. }
            | Self::NotFound { field, .. }
            | Self::AlreadyExists { field, .. }
            | Self::FailedPrecondition { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::Unavailable { field, .. }
            | Self::ResourceExhausted { field, .. } => Some(field),
            Self::VersionMismatch { .. } => Some("expected_version"),
        }
    }

    /// The same rejection with `prefix` put before its field path, so that a rule
    /// checked on one measurement can say which measurement of a batch broke it.
    pub fn within(mut self, prefix: &str) -> Self {
        match &mut self {
            Self::InvalidArgument { field, .. }
            | Self::NotFound { field, .. }
            | Self::AlreadyExists { field, .. }
            | Self::FailedPrecondition { field, .. }
            | Self::OutOfRange { field, .. }
            | Self::Unavailable { field, .. }
            | Self::ResourceExhausted { field, .. } => *field = format!("{prefix}.{field}"),
            Self::VersionMismatch { .. } => {}
        }
        self
    }
}
