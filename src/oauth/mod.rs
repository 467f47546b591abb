//! The wgtwo OAuth 2.0 client: what the official SDK does, plus verified ID tokens, PKCE, typed
//! permanent/transient errors and secrets that cannot be logged by accident.

pub mod authorization;
pub mod cached;
pub mod client;
pub mod error;
pub mod http;
pub mod secrets;
pub mod token;

pub use authorization::{AuthorizationRequest, CallbackOutcome, PendingAuthorization, Prompt, parse_callback};
pub use cached::CachedTokenSource;
pub use client::{ClientConfig, RefreshAnswer, UserInfo, WgtwoClient};
pub use error::{ErrorClass, OAuthError};
pub use token::{IdTokenInfo, TokenSet};
