//! Resilience at the proxy: circuit breaking per destination ([`limits`], client side) and
//! local rate limiting at the destination ([`ratelimit`], server side). Endpoint choice and
//! outlier detection live in [`crate::balance`].

pub mod limits;
pub mod ratelimit;

pub use limits::{LimitPermit, Limits};
pub use ratelimit::{RateLimiters, TokenBucket};
