//! The one place where errors become gRPC statuses.
//!
//! Every failure a caller can see is an [`ApiError`]: a reason from a closed
//! set, mapped to its status code by one exhaustive match, and a message a
//! person can act on. Internal causes are logged here and never returned.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{EnvError, ValidationError},
    store::StoreError,
};

/// The `google.rpc.ErrorInfo` domain of every error.
pub const ERROR_DOMAIN: &str = "billing-mode.molecule";

/// The closed set of error reasons (the contract's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    InvalidWorkspaceId,
    InvalidMode,
    InvalidField,
    NothingToSet,
    ReasonRequired,
    InvalidEnvKey,
    DuplicateEnvKey,
    LimitExceeded,
    WorkspaceNotFound,
    RevisionMismatch,
    MissingByokCredential,
    MissingPlatformProxy,
    ModelMismatch,
    StoreUnavailable,
    Unauthenticated,
    PermissionDenied,
    /// Watch: a cursor the service did not hand out.
    InvalidCursor,
    /// Watch: the server is shutting down; resume elsewhere.
    ShuttingDown,
    /// A stored row or log entry the service cannot interpret; do not retry.
    StoreCorrupt,
    /// Watch: the cursor is older than the retained log.
    CursorExpired,
    /// Watch: the consumer fell too far behind.
    ConsumerTooSlow,
    /// A failure that means a bug in the service (e.g. a constraint the
    /// database enforced); the cause is logged, never returned.
    Internal,
    /// A request over the message size limit (raised by tonic's codec; its
    /// code is tonic's, `OUT_OF_RANGE`).
    MessageTooLarge,
    /// The call ran past its deadline (the server's request timeout, or the
    /// caller's `grpc-timeout`); answered as tonic does, `CANCELLED`.
    DeadlineExceeded,
    /// A method or service this server does not have (a client newer than
    /// the server, or a misspelled method); raised by the gRPC layer.
    Unimplemented,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 25] = [
        ErrorReason::InvalidWorkspaceId,
        ErrorReason::InvalidMode,
        ErrorReason::InvalidField,
        ErrorReason::NothingToSet,
        ErrorReason::ReasonRequired,
        ErrorReason::InvalidEnvKey,
        ErrorReason::DuplicateEnvKey,
        ErrorReason::LimitExceeded,
        ErrorReason::WorkspaceNotFound,
        ErrorReason::RevisionMismatch,
        ErrorReason::MissingByokCredential,
        ErrorReason::MissingPlatformProxy,
        ErrorReason::ModelMismatch,
        ErrorReason::StoreUnavailable,
        ErrorReason::Unauthenticated,
        ErrorReason::PermissionDenied,
        ErrorReason::InvalidCursor,
        ErrorReason::ShuttingDown,
        ErrorReason::StoreCorrupt,
        ErrorReason::CursorExpired,
        ErrorReason::ConsumerTooSlow,
        ErrorReason::Internal,
        ErrorReason::MessageTooLarge,
        ErrorReason::DeadlineExceeded,
        ErrorReason::Unimplemented,
    ];

    pub fn code(self) -> Code {
        match self {
            ErrorReason::InvalidWorkspaceId
            | ErrorReason::InvalidMode
            | ErrorReason::InvalidField
            | ErrorReason::NothingToSet
            | ErrorReason::ReasonRequired
            | ErrorReason::InvalidEnvKey
            | ErrorReason::DuplicateEnvKey
            | ErrorReason::LimitExceeded
            | ErrorReason::InvalidCursor => Code::InvalidArgument,
            ErrorReason::WorkspaceNotFound => Code::NotFound,
            ErrorReason::RevisionMismatch => Code::Aborted,
            ErrorReason::MissingByokCredential
            | ErrorReason::MissingPlatformProxy
            | ErrorReason::ModelMismatch => Code::FailedPrecondition,
            ErrorReason::StoreUnavailable | ErrorReason::ShuttingDown => Code::Unavailable,
            ErrorReason::Unauthenticated => Code::Unauthenticated,
            ErrorReason::PermissionDenied => Code::PermissionDenied,
            ErrorReason::StoreCorrupt => Code::DataLoss,
            ErrorReason::CursorExpired => Code::OutOfRange,
            ErrorReason::ConsumerTooSlow => Code::ResourceExhausted,
            ErrorReason::Internal => Code::Internal,
            ErrorReason::MessageTooLarge => Code::OutOfRange,
            ErrorReason::DeadlineExceeded => Code::Cancelled,
            ErrorReason::Unimplemented => Code::Unimplemented,
        }
    }

    /// How long the caller should wait before retrying, sent as a
    /// `google.rpc.RetryInfo` detail; every UNAVAILABLE reason has one, no
    /// other reason does.
    pub fn retry_delay(self) -> Option<Duration> {
        match self {
            // A store outage (failover, restart, network) lasts seconds: one
            // second is long enough not to pile on, short enough that a
            // provisioner retrying with backoff loses little.
            ErrorReason::StoreUnavailable => Some(Duration::from_secs(1)),
            // Another replica can answer at once; the pause lets the load
            // balancer take this one out of rotation first.
            ErrorReason::ShuttingDown => Some(Duration::from_millis(100)),
            ErrorReason::InvalidWorkspaceId
            | ErrorReason::InvalidMode
            | ErrorReason::InvalidField
            | ErrorReason::NothingToSet
            | ErrorReason::ReasonRequired
            | ErrorReason::InvalidEnvKey
            | ErrorReason::DuplicateEnvKey
            | ErrorReason::LimitExceeded
            | ErrorReason::WorkspaceNotFound
            | ErrorReason::RevisionMismatch
            | ErrorReason::MissingByokCredential
            | ErrorReason::MissingPlatformProxy
            | ErrorReason::ModelMismatch
            | ErrorReason::Unauthenticated
            | ErrorReason::PermissionDenied
            | ErrorReason::InvalidCursor
            | ErrorReason::StoreCorrupt
            | ErrorReason::CursorExpired
            | ErrorReason::ConsumerTooSlow
            | ErrorReason::Internal
            | ErrorReason::MessageTooLarge
            | ErrorReason::DeadlineExceeded
            | ErrorReason::Unimplemented => None,
        }
    }

    /// The `ErrorInfo.reason` string.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::InvalidWorkspaceId => "INVALID_WORKSPACE_ID",
            ErrorReason::InvalidMode => "INVALID_MODE",
            ErrorReason::InvalidField => "INVALID_FIELD",
            ErrorReason::NothingToSet => "NOTHING_TO_SET",
            ErrorReason::ReasonRequired => "REASON_REQUIRED",
            ErrorReason::InvalidEnvKey => "INVALID_ENV_KEY",
            ErrorReason::DuplicateEnvKey => "DUPLICATE_ENV_KEY",
            ErrorReason::LimitExceeded => "LIMIT_EXCEEDED",
            ErrorReason::WorkspaceNotFound => "WORKSPACE_NOT_FOUND",
            ErrorReason::RevisionMismatch => "REVISION_MISMATCH",
            ErrorReason::MissingByokCredential => "MISSING_BYOK_CREDENTIAL",
            ErrorReason::MissingPlatformProxy => "MISSING_PLATFORM_PROXY",
            ErrorReason::ModelMismatch => "MODEL_MISMATCH",
            ErrorReason::StoreUnavailable => "STORE_UNAVAILABLE",
            ErrorReason::Unauthenticated => "UNAUTHENTICATED",
            ErrorReason::PermissionDenied => "PERMISSION_DENIED",
            ErrorReason::InvalidCursor => "INVALID_CURSOR",
            ErrorReason::ShuttingDown => "SHUTTING_DOWN",
            ErrorReason::StoreCorrupt => "STORE_CORRUPT",
            ErrorReason::CursorExpired => "CURSOR_EXPIRED",
            ErrorReason::ConsumerTooSlow => "CONSUMER_TOO_SLOW",
            ErrorReason::Internal => "INTERNAL",
            ErrorReason::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorReason::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorReason::Unimplemented => "UNIMPLEMENTED",
        }
    }
}

/// An error a caller sees: reason plus a message naming what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", reason.as_str())]
pub struct ApiError {
    pub reason: ErrorReason,
    pub message: String,
}

impl ApiError {
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Self {
        ApiError {
            reason,
            message: message.into(),
        }
    }

    /// A field that failed validation, named in the message.
    pub fn field(field: &str, e: &ValidationError) -> Self {
        let reason = match e {
            ValidationError::WorkspaceId => ErrorReason::InvalidWorkspaceId,
            ValidationError::Mode => ErrorReason::InvalidMode,
            ValidationError::EnvKey | ValidationError::CredentialKey { .. } => {
                ErrorReason::InvalidEnvKey
            }
            ValidationError::TooManyCredentialKeys { .. } => ErrorReason::LimitExceeded,
            ValidationError::TooLong { .. }
            | ValidationError::BadCharacters { .. }
            | ValidationError::ControlCharacters { .. }
            | ValidationError::Empty { .. } => ErrorReason::InvalidField,
        };
        let message = e.to_string();
        if message.starts_with(field) {
            ApiError::new(reason, message)
        } else {
            ApiError::new(reason, format!("{field}: {message}"))
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let mut details = ErrorDetails::with_error_info(e.reason.as_str(), ERROR_DOMAIN, []);
        if let Some(delay) = e.reason.retry_delay() {
            details.set_retry_info(Some(delay));
        }
        Status::with_error_details(e.reason.code(), e.message, details)
    }
}

impl From<EnvError> for ApiError {
    fn from(e: EnvError) -> Self {
        let reason = match &e {
            EnvError::InvalidKey { .. } => ErrorReason::InvalidEnvKey,
            EnvError::InvalidOrigin { .. } => ErrorReason::InvalidField,
            EnvError::DuplicateKey { .. } => ErrorReason::DuplicateEnvKey,
            EnvError::TooManyEntries { .. } | EnvError::ValueTooLong { .. } => {
                ErrorReason::LimitExceeded
            }
            EnvError::ModelMismatch { .. } => ErrorReason::ModelMismatch,
            EnvError::MissingByokCredential { .. } => ErrorReason::MissingByokCredential,
            EnvError::MissingPlatformProxy { .. } => ErrorReason::MissingPlatformProxy,
        };
        ApiError::new(reason, crate::wire::convert::env_error_message(&e))
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => ApiError::new(
                ErrorReason::WorkspaceNotFound,
                "the authority has no record of this workspace; register it with Set first",
            ),
            StoreError::RevisionMismatch { expected, actual } => ApiError::new(
                ErrorReason::RevisionMismatch,
                match actual {
                    Some(a) => format!(
                        "expected revision {expected} but the record is at revision {a}; \
                         re-read it with Resolve and retry"
                    ),
                    None => format!(
                        "expected revision {expected} but the workspace has no record; \
                         use expected_revision 0 to create it"
                    ),
                },
            ),
            StoreError::Unavailable(_) => {
                tracing::error!(error = %ErrorChain(&e), "store failure");
                ApiError::new(
                    ErrorReason::StoreUnavailable,
                    "the billing-mode store is unavailable; no decision was made, retry later",
                )
            }
            StoreError::Corrupt { .. } => {
                tracing::error!(error = %ErrorChain(&e), "stored data is unreadable");
                ApiError::new(
                    ErrorReason::StoreCorrupt,
                    "the billing-mode store holds data the service cannot read; no decision \
                     was made, and retrying will not help: an operator must repair the store",
                )
            }
            StoreError::Internal { .. } => {
                tracing::error!(error = %ErrorChain(&e), "store failure that indicates a bug");
                ApiError::new(
                    ErrorReason::Internal,
                    "internal error in the billing-mode service; no decision was made",
                )
            }
        }
    }
}

/// Displays an error with its whole cause chain, for logs.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let chain = std::iter::successors(Some(self.0), |e| e.source());
        f.write_str(&chain_text(chain.map(|e| e.to_string())))
    }
}

/// An error and its causes, as `{:#}` shows them (joined by ": "), without
/// the causes an error already shows in its own text: several (sqlx's, our
/// store's) both show their cause and return it as their source, so `{:#}`
/// says the same thing two or three times over.
pub fn anyhow_text(e: &anyhow::Error) -> String {
    chain_text(e.chain().map(|c| c.to_string()))
}

fn chain_text(causes: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    let mut previous: Option<String> = None;
    for cause in causes {
        let shown = previous.as_deref().is_some_and(|p| p.contains(&cause));
        if !shown {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&cause);
        }
        previous = Some(cause);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_an_error_already_shows_is_not_shown_again() {
        let causes = [
            "opening the store (sqlite:/x.db)",
            "store unavailable: error returned from database: (code: 14) unable to open",
            "error returned from database: (code: 14) unable to open",
            "(code: 14) unable to open",
        ];
        assert_eq!(
            chain_text(causes.iter().map(|c| c.to_string())),
            "opening the store (sqlite:/x.db): store unavailable: error returned from database: \
             (code: 14) unable to open"
        );
        // Causes that add something are all kept.
        let causes = ["reading tokens.txt", "line 3", "unknown role `x`"];
        assert_eq!(
            chain_text(causes.iter().map(|c| c.to_string())),
            "reading tokens.txt: line 3: unknown role `x`"
        );
    }

    #[test]
    fn every_reason_maps_to_the_contract_code() {
        let expected = [
            ("INVALID_WORKSPACE_ID", Code::InvalidArgument),
            ("INVALID_MODE", Code::InvalidArgument),
            ("INVALID_FIELD", Code::InvalidArgument),
            ("NOTHING_TO_SET", Code::InvalidArgument),
            ("REASON_REQUIRED", Code::InvalidArgument),
            ("INVALID_ENV_KEY", Code::InvalidArgument),
            ("DUPLICATE_ENV_KEY", Code::InvalidArgument),
            ("LIMIT_EXCEEDED", Code::InvalidArgument),
            ("WORKSPACE_NOT_FOUND", Code::NotFound),
            ("REVISION_MISMATCH", Code::Aborted),
            ("MISSING_BYOK_CREDENTIAL", Code::FailedPrecondition),
            ("MISSING_PLATFORM_PROXY", Code::FailedPrecondition),
            ("MODEL_MISMATCH", Code::FailedPrecondition),
            ("STORE_UNAVAILABLE", Code::Unavailable),
            ("UNAUTHENTICATED", Code::Unauthenticated),
            ("PERMISSION_DENIED", Code::PermissionDenied),
            ("INVALID_CURSOR", Code::InvalidArgument),
            ("SHUTTING_DOWN", Code::Unavailable),
            ("STORE_CORRUPT", Code::DataLoss),
            ("CURSOR_EXPIRED", Code::OutOfRange),
            ("CONSUMER_TOO_SLOW", Code::ResourceExhausted),
            ("INTERNAL", Code::Internal),
            ("MESSAGE_TOO_LARGE", Code::OutOfRange),
            ("DEADLINE_EXCEEDED", Code::Cancelled),
            ("UNIMPLEMENTED", Code::Unimplemented),
        ];
        assert_eq!(ErrorReason::ALL.len(), expected.len());
        for (reason, (name, code)) in ErrorReason::ALL.iter().zip(expected) {
            assert_eq!(reason.as_str(), name);
            assert_eq!(reason.code(), code, "{name}");
        }
    }

    #[test]
    fn a_status_carries_error_info_with_reason_and_domain() {
        let status: Status = ApiError::new(ErrorReason::ModelMismatch, "fix it").into();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.message(), "fix it");
        let info = status.get_details_error_info().expect("ErrorInfo detail");
        assert_eq!(info.reason, "MODEL_MISMATCH");
        assert_eq!(info.domain, ERROR_DOMAIN);
    }

    #[test]
    fn every_unavailable_answer_says_when_to_retry() {
        for reason in ErrorReason::ALL {
            let status: Status = ApiError::new(reason, "x").into();
            let retry = status.get_details_retry_info();
            if reason.code() == Code::Unavailable {
                let delay = retry
                    .and_then(|r| r.retry_delay)
                    .unwrap_or_else(|| panic!("{} has no RetryInfo", reason.as_str()));
                assert!(delay > Duration::ZERO, "{}", reason.as_str());
            } else {
                assert!(retry.is_none(), "{} has a RetryInfo", reason.as_str());
            }
            assert_eq!(
                status.get_details_error_info().map(|i| i.reason),
                Some(reason.as_str().to_owned())
            );
        }
    }

    #[test]
    fn store_failures_never_reveal_their_cause() {
        let e =
            StoreError::Unavailable(sqlx::Error::Protocol("password=hunter2 at db-host".into()));
        let api: ApiError = e.into();
        assert_eq!(api.reason, ErrorReason::StoreUnavailable);
        assert!(!api.message.contains("hunter2") && !api.message.contains("db-host"));
    }

    fn database_error(backend_error: sqlx::Error) -> ApiError {
        crate::store::classify(backend_error).into()
    }

    #[test]
    fn a_corrupt_row_is_data_loss_and_its_cause_stays_in_the_log() {
        let json = serde_json::from_str::<serde_json::Value>("{\"runtime\": hunter2").unwrap_err();
        let e = StoreError::corrupt_because("audit fields", json);
        assert!(ErrorChain(&e).to_string().contains("audit fields: "));
        let api: ApiError = e.into();
        assert_eq!(api.reason, ErrorReason::StoreCorrupt);
        assert_eq!(api.reason.code(), Code::DataLoss);
        assert!(
            api.reason.retry_delay().is_none(),
            "no retry for a corrupt row"
        );
        assert!(!api.message.contains("audit") && !api.message.contains("hunter2"));
        let decode = sqlx::Error::ColumnDecode {
            index: "\"revision\"".into(),
            source: "db-host".into(),
        };
        let api = database_error(decode);
        assert_eq!(api.reason, ErrorReason::StoreCorrupt);
        assert!(!api.message.contains("revision") && !api.message.contains("db-host"));
    }

    #[test]
    fn a_failure_that_means_a_bug_is_internal_with_a_generic_message() {
        let api: ApiError = StoreError::internal("record creation raced twice").into();
        assert_eq!(api.reason, ErrorReason::Internal);
        assert_eq!(api.reason.code(), Code::Internal);
        assert!(!api.message.contains("raced"));
        let api = database_error(sqlx::Error::RowNotFound);
        assert_eq!(api.reason, ErrorReason::Internal);
    }

    #[test]
    fn an_unreachable_store_is_unavailable_with_retry_info() {
        let api = database_error(sqlx::Error::PoolTimedOut);
        assert_eq!(api.reason, ErrorReason::StoreUnavailable);
        let status: Status = api.into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.get_details_retry_info().is_some());
    }
}
