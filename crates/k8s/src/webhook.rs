//! The mutating admission webhook that serves injection, and its
//! `MutatingWebhookConfiguration` (owned by the inject engineer).
