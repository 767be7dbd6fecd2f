//! `plexus install kubernetes`: one YAML stream with the CRDs, namespace, RBAC, ServiceAccount,
//! Secrets, control-plane Deployment and Service, and the MutatingWebhookConfiguration.
