//! Configuration analysis for `plexus check`: problems a valid set of resources can still have.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::MeshSnapshot;
use crate::names::ServiceName;
use crate::resource::{Resource, Spec};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Traffic will fail or not go where the user meant (✗).
    Error,
    /// Probably not what was meant (‼).
    Warning,
}

/// One problem, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// `HTTPRoute default/reviews`.
    pub object: String,
    pub message: String,
    pub hint: String,
}

/// Analyses resources: routes attached to or pointing at missing Services, rules whose
/// weights sum to 0, rules shadowed by an earlier identical match.
pub fn analyze(resources: &[Resource]) -> Vec<Finding> {
    let services: BTreeSet<ServiceName> = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::Service(_)))
        .map(|r| ServiceName::new(&r.metadata.name, r.metadata.namespace()))
        .collect();
    let mut findings = Vec::new();
    for r in resources {
        let Spec::HttpRoute(h) = &r.spec else { continue };
        let object = format!("HTTPRoute {}", r.key());
        let ns = r.metadata.namespace();
        for p in &h.parent_refs {
            let parent = ServiceName::new(&p.name, p.namespace.as_deref().unwrap_or(ns));
            if !services.contains(&parent) {
                findings.push(Finding {
                    severity: Severity::Error,
                    object: object.clone(),
                    message: format!("attached to Service {parent}, which does not exist"),
                    hint: format!("create Service {parent} or fix parentRefs"),
                });
            }
        }
        for (ri, rule) in h.rules.iter().enumerate() {
            for b in &rule.backend_refs {
                let backend = ServiceName::new(&b.name, b.namespace.as_deref().unwrap_or(ns));
                if !services.contains(&backend) {
                    findings.push(Finding {
                        severity: Severity::Error,
                        object: object.clone(),
                        message: format!("rule {ri} sends traffic to Service {backend}, which does not exist (answered with 500 backend not found)"),
                        hint: format!("create Service {backend} or fix backendRefs"),
                    });
                }
            }
            if !rule.backend_refs.is_empty() && rule.backend_refs.iter().all(|b| b.weight == 0) {
                findings.push(Finding {
                    severity: Severity::Error,
                    object: object.clone(),
                    message: format!("rule {ri}: backend weights sum to 0, so every matching request gets 500"),
                    hint: "give at least one backendRef a positive weight".into(),
                });
            }
        }
    }
    findings.extend(shadowed(resources));
    findings
}

/// Entries whose match is identical to one with higher precedence on the same Service port:
/// they can never be chosen.
fn shadowed(resources: &[Resource]) -> Vec<Finding> {
    let snapshot = MeshSnapshot::compile(resources, "check");
    let mut out = Vec::new();
    let mut reported = BTreeSet::new();
    for service in snapshot.services.values() {
        for port in &service.ports {
            let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
            for e in &port.routes.entries {
                let key = serde_json::to_string(&e.matcher).unwrap_or_default();
                match seen.get(&key) {
                    Some((route, rule)) if !(route == &e.route && *rule == e.rule) => {
                        if reported.insert((e.route.clone(), e.rule)) {
                            out.push(Finding {
                                severity: Severity::Warning,
                                object: format!("HTTPRoute {}", e.route),
                                message: format!("rule {} is shadowed by HTTPRoute {route} rule {rule}, which matches the same requests first", e.rule),
                                hint: "make the matches differ, or merge the rules".into(),
                            });
                        }
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(key, (e.route.clone(), e.rule));
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_services_zero_weights_and_shadowed_rules() {
        let yaml = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: a}\nspec:\n  parentRefs: [{name: reviews}, {name: ghost}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: reviews}]\n  - backendRefs: [{name: missing}]\n  - matches: [{path: {type: PathPrefix, value: /z}}]\n    backendRefs: [{name: reviews, weight: 0}]\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: b}\nspec:\n  parentRefs: [{name: reviews}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /x}}]\n    backendRefs: [{name: reviews}]\n";
        let resources = crate::parse_documents("t", yaml).expect("valid");
        let f = analyze(&resources);
        let messages: Vec<String> = f.iter().map(|f| format!("{} {}", f.object, f.message)).collect();
        assert!(messages.iter().any(|m| m.contains("ghost.default, which does not exist")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("rule 1 sends traffic to Service missing.default")), "{messages:?}");
        assert!(messages.iter().any(|m| m.contains("rule 2: backend weights sum to 0")), "{messages:?}");
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("HTTPRoute default/b rule 0 is shadowed by HTTPRoute default/a rule 0")),
            "{messages:?}"
        );
        assert_eq!(f.len(), 4, "{messages:?}");
        let clean = crate::parse_documents("t", "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n").expect("valid");
        assert!(analyze(&clean).is_empty());
    }
}
