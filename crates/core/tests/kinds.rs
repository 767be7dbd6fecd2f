//! Every resource kind of SPEC §4, as users write them: a realistic valid example that parses
//! and round-trips through the stored JSON form, invalid variants reported with their exact
//! field path and reason, apply atomicity, how the kinds compile into the model proxies use,
//! and the shipped examples.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::HeaderMap;
use plexus_core::check::{Severity, analyze};
use plexus_core::route::{PathMatcher, RequestInfo, RouteEntry, RouteTable};
use plexus_core::{Kind, MeshSnapshot, Resource, parse_documents, resource_from_value};

// ---------------------------------------------------------------------------------------------
// helpers

/// Parses `yaml`, which must be valid and hold exactly one resource of `kind`, and checks that
/// it round-trips: serialized to JSON (as the store keeps it) and decoded again, it is equal.
fn valid(kind: Kind, yaml: &str) -> Resource {
    let mut resources = match parse_documents("valid.yaml", yaml) {
        Ok(r) => r,
        Err(e) => panic!("the {kind} example must be valid:\n{e}"),
    };
    assert_eq!(resources.len(), 1, "one document");
    let r = resources.remove(0);
    assert_eq!(r.kind, kind);
    let json = serde_json::to_value(&r).expect("serializable");
    let back = resource_from_value(json.clone()).unwrap_or_else(|e| panic!("{kind} does not decode from {json}: {e}"));
    assert_eq!(back, r, "{kind} round-trips through JSON");
    // What is stored is also valid input: the JSON form parses and validates the same way.
    let again = parse_documents("stored.json", &json.to_string()).unwrap_or_else(|e| panic!("{json}:\n{e}"));
    assert_eq!(again, vec![r.clone()]);
    r
}

/// `base` with `from` replaced by `to` (which must occur: a mutation that changes nothing would
/// make an invalid-variant test pass vacuously).
fn mutate(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "{from:?} does not occur in the example");
    base.replacen(from, to, 1)
}

/// `yaml` must be rejected with an error at exactly `field` whose reason contains `reason`.
fn invalid(yaml: &str, field: &str, reason: &str) {
    let err = match parse_documents("bad.yaml", yaml) {
        Ok(_) => panic!("accepted, but should fail at {field} ({reason}):\n{yaml}"),
        Err(e) => e,
    };
    assert!(
        err.errors.iter().any(|e| e.field == field && e.reason.contains(reason) && e.document == 1),
        "expected an error at {field:?} containing {reason:?}, got:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// one valid example and invalid variants per kind

const MESH_CONFIG: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: MeshConfig
metadata:
  name: default
spec:
  trustDomain: example.org
  mtls:
    mode: strict
  certificates:
    leafLifetime: 24h
    issuerLifetime: 8760h
  defaultAuthorization: authenticated
  outboundTrafficPolicy: registryOnly
  tracing:
    sampling: 10
    otlpEndpoint: http://otel-collector.observability:4317
  accessLog:
    format: json
"#;

#[test]
fn mesh_config() {
    let r = valid(Kind::MeshConfig, MESH_CONFIG);
    assert_eq!(r.metadata.namespace, None);
    invalid(&mutate(MESH_CONFIG, "name: default", "name: mesh"), "metadata.name", "named \"default\"");
    invalid(
        &mutate(MESH_CONFIG, "name: default", "name: default\n  namespace: prod"),
        "metadata.namespace",
        "mesh-wide",
    );
    invalid(&mutate(MESH_CONFIG, "mode: strict", "mode: on-demand"), "spec.mtls.mode", "unknown variant");
    invalid(&mutate(MESH_CONFIG, "sampling: 10", "sampling: 150"), "spec.tracing.sampling", "not between 0 and 100");
    invalid(
        &mutate(MESH_CONFIG, "leafLifetime: 24h", "leafLifetime: 10 seconds"),
        "spec.certificates.leafLifetime",
        "invalid duration",
    );
    invalid(
        &mutate(MESH_CONFIG, "leafLifetime: 24h", "leafLifetime: 1m"),
        "spec.certificates.leafLifetime",
        "between 10m and 2160h",
    );
    invalid(&mutate(MESH_CONFIG, "trustDomain:", "trustDomian:"), "spec.trustDomian", "unknown field");
}

const SERVICE: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Service
metadata:
  name: reviews
  namespace: default
  labels: {app: reviews}
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
    targetPort: 9080
    appProtocol: http
  - name: grpc
    port: 9090
    targetPort: grpc
    appProtocol: grpc
"#;

#[test]
fn service() {
    valid(Kind::Service, SERVICE);
    invalid(
        &mutate(SERVICE, "appProtocol: http", "appProtocol: udp"),
        "spec.ports[0].appProtocol",
        "is not one of http",
    );
    invalid(&mutate(SERVICE, "port: 9080", "port: 70000"), "spec.ports[0].port", "invalid value");
    invalid(&mutate(SERVICE, "port: 9090", "port: 9080"), "spec.ports[1].port", "listed twice");
    invalid(&mutate(SERVICE, "appProtocol: http", "protocol: TCP"), "spec.ports[0].protocol", "unknown field");
    invalid(&mutate(SERVICE, "name: reviews", "name: Reviews_1"), "metadata.name", "not a valid name");
}

const WORKLOAD: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: Workload
metadata:
  name: reviews-v1-7f9c
  labels: {app: reviews, version: v1}
  annotations: {example.com/owner: team-books}
  resourceVersion: "42"
  uid: 3c1f0d2e
  creationTimestamp: "2024-05-01T10:00:00Z"
spec:
  address: 10.0.0.12
  ports:
  - name: http
    port: 15006
    targetPort: 9080
  serviceAccount: reviews
  meshed: true
status:
  ignored: true
"#;

#[test]
fn workload() {
    let r = valid(Kind::Workload, WORKLOAD);
    assert_eq!(r.metadata.labels.get("version").map(String::as_str), Some("v1"));
    invalid(&mutate(WORKLOAD, "address: 10.0.0.12", "address: reviews.local"), "spec.address", "not an IP address");
    invalid(&mutate(WORKLOAD, "  address: 10.0.0.12\n", ""), "spec", "missing field `address`");
    invalid(&mutate(WORKLOAD, "meshed: true", "meshed: sometimes"), "spec.meshed", "invalid type");
    invalid(
        &mutate(WORKLOAD, "serviceAccount: reviews", "serviceAccount: Reviews_SA"),
        "spec.serviceAccount",
        "not a valid name",
    );
    invalid(&mutate(WORKLOAD, "  uid: 3c1f0d2e", "  generation: 3"), "metadata.generation", "unknown field");
}

const EXTERNAL_SERVICE: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: ExternalService
metadata:
  name: googleapis
spec:
  hosts: [www.googleapis.com, "*.storage.googleapis.com", 203.0.113.7]
  ports:
  - 80
  - {port: 443, name: https, protocol: https}
  protocol: http
"#;

#[test]
fn external_service() {
    valid(Kind::ExternalService, EXTERNAL_SERVICE);
    invalid(&mutate(EXTERNAL_SERVICE, "protocol: http\n", "protocol: ftp\n"), "spec.protocol", "is not one of");
    invalid(
        &mutate(EXTERNAL_SERVICE, "protocol: https}", "protocol: quic}"),
        "spec.ports[1].protocol",
        "is not one of",
    );
    invalid(&mutate(EXTERNAL_SERVICE, "  - 80\n", "  - 0\n"), "spec.ports[0]", "between 1 and 65535");
    invalid(
        &mutate(EXTERNAL_SERVICE, "www.googleapis.com", "www.Google_APIs.com"),
        "spec.hosts[0]",
        "not a valid name",
    );
    invalid(
        &mutate(
            EXTERNAL_SERVICE,
            "  hosts: [www.googleapis.com, \"*.storage.googleapis.com\", 203.0.113.7]\n",
            "  hosts: []\n",
        ),
        "spec.hosts",
        "at least one host",
    );
}

const HTTP_ROUTE_GROUP: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: reviews-api
spec:
  matches:
  - name: reads
    pathRegex: "/reviews/[0-9]+"
    methods: [GET, HEAD]
  - name: testers
    headers:
      end-user: "jason|tester"
  - name: everything
    methods: ["*"]
"#;

#[test]
fn http_route_group() {
    valid(Kind::HttpRouteGroup, HTTP_ROUTE_GROUP);
    invalid(&mutate(HTTP_ROUTE_GROUP, "[0-9]+", "[0-9+"), "spec.matches[0].pathRegex", "invalid regular expression");
    invalid(
        &mutate(HTTP_ROUTE_GROUP, "[GET, HEAD]", "[GET, FETCH]"),
        "spec.matches[0].methods",
        "\"FETCH\" is not one of",
    );
    invalid(&mutate(HTTP_ROUTE_GROUP, "name: testers", "name: reads"), "spec.matches[1].name", "listed twice");
    invalid(
        &mutate(HTTP_ROUTE_GROUP, "\"jason|tester\"", "\"(jason\""),
        "spec.matches[1].headers.end-user",
        "invalid regular expression",
    );
    invalid(&mutate(HTTP_ROUTE_GROUP, "  - name: everything\n", "  - "), "spec.matches[2]", "missing field `name`");
}

const FAULT_INJECTION: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: FaultInjection
metadata:
  name: ratings-faults
spec:
  delay:
    fixed: 7s
    percent: 100
  abort:
    httpStatus: 503
    percent: 10
"#;

#[test]
fn fault_injection() {
    valid(Kind::FaultInjection, FAULT_INJECTION);
    valid(Kind::FaultInjection, &mutate(FAULT_INJECTION, "httpStatus: 503", "grpcStatus: unavailable"));
    invalid(&mutate(FAULT_INJECTION, "    httpStatus: 503\n", ""), "spec.abort", "set httpStatus or grpcStatus");
    invalid(&mutate(FAULT_INJECTION, "fixed: 7s", "fixed: 10 seconds"), "spec.delay.fixed", "invalid duration");
    invalid(
        &mutate(FAULT_INJECTION, "percent: 100", "percent: 150"),
        "spec.delay.percent",
        "150 is not between 0 and 100",
    );
    invalid(
        &mutate(FAULT_INJECTION, "httpStatus: 503", "httpStatus: 99"),
        "spec.abort.httpStatus",
        "not an HTTP status",
    );
    invalid(
        &mutate(FAULT_INJECTION, "httpStatus: 503", "grpcStatus: ok"),
        "spec.abort.grpcStatus",
        "not a gRPC error status",
    );
    invalid(
        "apiVersion: plexus.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: nothing}\nspec: {}\n",
        "spec",
        "set delay, abort or both",
    );
    invalid(&mutate(FAULT_INJECTION, "    fixed: 7s\n", ""), "spec.delay", "missing field `fixed`");
}

const GATEWAY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: ingress
spec:
  gatewayClassName: plexus
  listeners:
  - name: http
    port: 8080
    protocol: HTTP
    allowedRoutes:
      namespaces: {from: All}
      kinds: [{kind: HTTPRoute}]
  - name: https
    hostname: "*.bookinfo.example.com"
    port: 8443
    protocol: HTTPS
    tls:
      mode: Terminate
      certificateRefs:
      - {kind: Secret, name: bookinfo-cert}
"#;

#[test]
fn gateway() {
    valid(Kind::Gateway, GATEWAY);
    // The gateway binds the address its proxy is started with: a requested address is refused,
    // not accepted and ignored.
    invalid(
        &mutate(
            GATEWAY,
            "  gatewayClassName: plexus\n",
            "  gatewayClassName: plexus\n  addresses: [{value: 127.0.0.9}]\n",
        ),
        "spec.addresses[0]",
        "not supported",
    );
    invalid(
        &mutate(
            GATEWAY,
            "  gatewayClassName: plexus\n",
            "  gatewayClassName: plexus\n  addresses: [{value: lb.example}]\n",
        ),
        "spec.addresses[0]",
        "is not an IPAddress",
    );
    invalid(
        &mutate(GATEWAY, "protocol: HTTP\n", "protocol: UDP\n"),
        "spec.listeners[0].protocol",
        "\"UDP\" is not HTTP or HTTPS",
    );
    invalid(
        &mutate(
            GATEWAY,
            "      certificateRefs:\n      - {kind: Secret, name: bookinfo-cert}\n",
            "      certificateRefs: []\n",
        ),
        "spec.listeners[1].tls.certificateRefs",
        "needs a certificate",
    );
    invalid(&mutate(GATEWAY, "name: https", "name: http"), "spec.listeners[1].name", "listed twice");
    invalid(
        &mutate(GATEWAY, "\"*.bookinfo.example.com\"", "\"10.0.0.1\""),
        "spec.listeners[1].hostname",
        "is an IP address",
    );
    invalid(
        &mutate(GATEWAY, "\"*.bookinfo.example.com\"", "\"a.*.example.com\""),
        "spec.listeners[1].hostname",
        "only allowed as the first label",
    );
    invalid(&mutate(GATEWAY, "mode: Terminate", "mode: Passthrough"), "spec.listeners[1].tls.mode", "use Terminate");
    // tls.options: session resumption on or off, nothing else.
    let options =
        |o: &str| mutate(GATEWAY, "      mode: Terminate\n", &format!("      mode: Terminate\n      options: {o}\n"));
    valid(Kind::Gateway, &options(r#"{plexus.dev/session-resumption: "off"}"#));
    valid(Kind::Gateway, &options(r#"{plexus.dev/session-resumption: "on"}"#));
    invalid(
        &options(r#"{plexus.dev/session-resumption: "no"}"#),
        "spec.listeners[1].tls.options",
        "\"no\" is not \"on\" or \"off\"",
    );
    invalid(
        &options(r#"{example.com/cipher: fast}"#),
        "spec.listeners[1].tls.options",
        "\"example.com/cipher\" is not a TLS option (supported: plexus.dev/session-resumption)",
    );
    invalid(
        &mutate(GATEWAY, "{kind: Secret, name: bookinfo-cert}", "{kind: ConfigMap, name: bookinfo-cert}"),
        "spec.listeners[1].tls.certificateRefs[0]",
        "a certificate is a Secret",
    );
    invalid(
        &mutate(GATEWAY, "gatewayClassName: plexus", "gatewayClassName: istio"),
        "spec.gatewayClassName",
        "not a Plexus gateway class",
    );
    invalid(
        &mutate(GATEWAY, "from: All", "from: Selector"),
        "spec.listeners[0].allowedRoutes.namespaces.from",
        "no namespace labels",
    );
    invalid(
        &mutate(GATEWAY, "from: All", "from: Elsewhere"),
        "spec.listeners[0].allowedRoutes.namespaces.from",
        "not Same or All",
    );
    invalid(&mutate(GATEWAY, "port: 8080", "port: http"), "spec.listeners[0].port", "invalid type");
    invalid(&mutate(GATEWAY, "gatewayClassName: plexus", "className: plexus"), "spec.className", "unknown field");
}

const HTTP_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: reviews
    port: 9080
  rules:
  - name: jason
    matches:
    - path: {type: PathPrefix, value: /reviews}
      headers: [{name: end-user, value: jason}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-canary, value: "true"}]
        remove: [x-debug]
    - type: ExtensionRef
      extensionRef: {group: plexus.dev, kind: FaultInjection, name: ratings-delay}
    backendRefs: [{name: reviews-v3, port: 9080}]
    timeouts: {request: 3s, backendRequest: 1s}
    retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
  - matches:
    - path: {type: PathPrefix, value: /old}
    filters:
    - type: URLRewrite
      urlRewrite:
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
    backendRefs: [{name: reviews-v1, port: 9080}]
  - matches:
    - path: {type: Exact, value: /moved}
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: books.example.com, statusCode: 301}
  - matches:
    - path: {type: RegularExpression, value: "/v[0-9]+/.*"}
      method: POST
      queryParams: [{type: RegularExpression, name: debug, value: "1|true"}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: reviews-v2, port: 9080}
        percent: 50
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-served-by, value: plexus}]
    backendRefs:
    - {name: reviews-v1, port: 9080, weight: 80}
    - {name: reviews-v2, port: 9080, weight: 20}
"#;

#[test]
fn http_route() {
    valid(Kind::HttpRoute, HTTP_ROUTE);
    invalid(
        &mutate(HTTP_ROUTE, "{type: PathPrefix, value: /old}", "{type: Exact, value: /old}"),
        "spec.rules[1].filters[0].urlRewrite.path.type",
        "ReplacePrefixMatch needs every match of the rule to be a PathPrefix",
    );
    invalid(
        &mutate(HTTP_ROUTE, "statusCode: 301", "statusCode: 307"),
        "spec.rules[2].filters[0].requestRedirect.statusCode",
        "307 is not 301 or 302",
    );
    invalid(
        &mutate(HTTP_ROUTE, "request: 3s", "request: 10 seconds"),
        "spec.rules[0].timeouts.request",
        "invalid duration",
    );
    invalid(
        &mutate(HTTP_ROUTE, "backendRequest: 1s", "backendRequest: 5s"),
        "spec.rules[0].timeouts.backendRequest",
        "longer than timeouts.request",
    );
    invalid(
        &mutate(HTTP_ROUTE, "percent: 50", "percent: 150"),
        "spec.rules[3].filters[0].requestMirror.percent",
        "between 0 and 100",
    );
    invalid(&mutate(HTTP_ROUTE, "weight: 80", "weight: eighty"), "spec.rules[3].backendRefs[0].weight", "invalid type");
    invalid(
        &mutate(HTTP_ROUTE, "kind: Service", "kind: Ingress"),
        "spec.parentRefs[0]",
        "kind \"Ingress\" is not supported",
    );
    // A gateway route: kind Gateway (group gateway.networking.k8s.io or absent), sectionName.
    let gateway_parent = mutate(
        HTTP_ROUTE,
        "  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n",
        "  - kind: Gateway\n    name: ingress\n    sectionName: https\n",
    );
    valid(Kind::HttpRoute, &gateway_parent);
    invalid(
        &mutate(&gateway_parent, "kind: Gateway", "group: example.com\n    kind: Gateway"),
        "spec.parentRefs[0].group",
        "not supported for kind Gateway",
    );
    invalid(
        &mutate(HTTP_ROUTE, "    port: 9080\n", "    sectionName: http\n"),
        "spec.parentRefs[0].sectionName",
        "selects a Gateway listener",
    );
    invalid(
        &mutate(HTTP_ROUTE, "method: POST", "method: FETCH"),
        "spec.rules[3].matches[0].method",
        "\"FETCH\" is not one of",
    );
    invalid(
        &mutate(HTTP_ROUTE, "codes: [502, 503]", "codes: [200]"),
        "spec.rules[0].retry.codes[0]",
        "not an HTTP error status",
    );
    invalid(
        &mutate(HTTP_ROUTE, "kind: FaultInjection", "kind: RateLimit"),
        "spec.rules[0].filters[1].extensionRef",
        "is not supported",
    );
    invalid(
        &mutate(HTTP_ROUTE, "backendRefs: [{name: reviews-v3", "backendRef: [{name: reviews-v3"),
        "spec.rules[0].backendRef",
        "unknown field",
    );
    invalid(
        &mutate(
            HTTP_ROUTE,
            "    - type: URLRewrite\n      urlRewrite:",
            "    - type: URLRewrite\n      requestRedirect:",
        ),
        "spec.rules[1].filters[0].urlRewrite",
        "required when type is UrlRewrite",
    );
    invalid(
        &mutate(
            HTTP_ROUTE,
            "  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: reviews\n    port: 9080\n",
            "",
        ),
        "spec.parentRefs",
        "needs at least one parentRef",
    );
}

const GRPC_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: cart
spec:
  parentRefs:
  - {kind: Service, name: cart, port: 9090}
  rules:
  - matches:
    - method: {service: shop.Cart, method: AddItem}
    - method: {type: RegularExpression, service: "shop\\.Cart", method: "Get.*"}
    backendRefs: [{name: cart-v2, port: 9090}]
    timeouts: {request: 2s}
    retry: {codes: [unavailable, 4], attempts: 2, backoff: 50ms}
  - matches:
    - headers: [{name: x-tenant, value: beta}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: beta}]
    - type: RequestMirror
      requestMirror:
        backendRef: {name: cart-shadow, port: 9090}
        fraction: {numerator: 1, denominator: 4}
    backendRefs: [{name: cart-v1, port: 9090}]
"#;

#[test]
fn grpc_route() {
    valid(Kind::GrpcRoute, GRPC_ROUTE);
    invalid(
        &mutate(
            GRPC_ROUTE,
            "    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: x-route, value: beta}]\n",
            "    - type: URLRewrite\n      urlRewrite: {hostname: cart.internal}\n",
        ),
        "spec.rules[1].filters[0].type",
        "is not a GRPCRoute filter",
    );
    invalid(
        &mutate(GRPC_ROUTE, "codes: [unavailable, 4]", "codes: [teapot]"),
        "spec.rules[0].retry.codes[0]",
        "is not a gRPC status code",
    );
    invalid(
        &mutate(GRPC_ROUTE, "service: shop.Cart, method: AddItem", "service: shop/Cart, method: AddItem"),
        "spec.rules[0].matches[0].method.service",
        "contain no '/'",
    );
    invalid(
        &mutate(GRPC_ROUTE, "{service: shop.Cart, method: AddItem}", "{type: Exact}"),
        "spec.rules[0].matches[0].method",
        "needs service, method or both",
    );
    invalid(
        &mutate(GRPC_ROUTE, "method: \"Get.*\"", "method: \"Get(.*\""),
        "spec.rules[0].matches[1].method.method",
        "invalid regular expression",
    );
    invalid(
        &mutate(GRPC_ROUTE, "denominator: 4", "denominator: 0"),
        "spec.rules[1].filters[1].requestMirror.fraction",
        "denominator > 0",
    );
    invalid(
        &mutate(GRPC_ROUTE, "{request: 2s}", "{request: 2s, idle: 5s}"),
        "spec.rules[0].timeouts.idle",
        "unknown field",
    );
    invalid(&mutate(GRPC_ROUTE, "attempts: 2", "attempts: 11"), "spec.rules[0].retry.attempts", "at most 10");
}

const TRAFFIC_SPLIT: &str = r#"
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata:
  name: reviews-canary
spec:
  service: reviews
  matches:
  - kind: HTTPRouteGroup
    name: reviews-api
    matches: [reads]
  backends:
  - service: reviews-v1
    weight: 90
  - service: reviews-v2
    weight: 10
"#;

#[test]
fn traffic_split() {
    valid(Kind::TrafficSplit, TRAFFIC_SPLIT);
    invalid(
        &mutate(TRAFFIC_SPLIT, "kind: HTTPRouteGroup", "kind: TCPRoute"),
        "spec.matches[0].kind",
        "not supported (use HTTPRouteGroup)",
    );
    invalid(&mutate(TRAFFIC_SPLIT, "weight: 90", "weight: -1"), "spec.backends[0].weight", "invalid value");
    invalid(&mutate(TRAFFIC_SPLIT, "    weight: 90\n", ""), "spec.backends[0]", "missing field `weight`");
    invalid(&mutate(TRAFFIC_SPLIT, "service: reviews\n", "service: Reviews\n"), "spec.service", "not a valid name");
    invalid(
        &mutate(
            TRAFFIC_SPLIT,
            "  backends:\n  - service: reviews-v1\n    weight: 90\n  - service: reviews-v2\n    weight: 10\n",
            "  backends: []\n",
        ),
        "spec.backends",
        "at least one backend",
    );
    invalid(
        &mutate(TRAFFIC_SPLIT, "apiVersion: split.smi-spec.io/v1alpha4", "apiVersion: split.smi-spec.io/v1alpha2"),
        "apiVersion",
        "must have apiVersion split.smi-spec.io/v1alpha4",
    );
}

const TRAFFIC_TARGET: &str = r#"
apiVersion: access.smi-spec.io/v1alpha4
kind: TrafficTarget
metadata:
  name: reviews-from-productpage
spec:
  destination:
    kind: ServiceAccount
    name: reviews
    namespace: default
  sources:
  - kind: ServiceAccount
    name: productpage
    namespace: default
  rules:
  - kind: HTTPRouteGroup
    name: reviews-api
    matches: [reads]
"#;

#[test]
fn traffic_target() {
    valid(Kind::TrafficTarget, TRAFFIC_TARGET);
    invalid(
        &mutate(
            TRAFFIC_TARGET,
            "  - kind: ServiceAccount\n    name: productpage",
            "  - kind: User\n    name: productpage",
        ),
        "spec.sources[0].kind",
        "not supported (use ServiceAccount)",
    );
    invalid(
        &mutate(TRAFFIC_TARGET, "kind: HTTPRouteGroup", "kind: TCPRoute"),
        "spec.rules[0].kind",
        "not supported (use HTTPRouteGroup)",
    );
    invalid(
        &mutate(
            TRAFFIC_TARGET,
            "  sources:\n  - kind: ServiceAccount\n    name: productpage\n    namespace: default\n",
            "  sources: []\n",
        ),
        "spec.sources",
        "at least one source",
    );
    invalid(
        &mutate(
            TRAFFIC_TARGET,
            "  destination:\n    kind: ServiceAccount\n    name: reviews\n    namespace: default\n",
            "",
        ),
        "spec",
        "missing field `destination`",
    );
}

const AUTHORIZATION_POLICY: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: reviews-from-productpage
spec:
  targetRef:
    kind: Service
    name: reviews
    port: 9080
  action: allow
  rules:
  - from:
      serviceAccounts: [productpage, prod/frontend]
      identities: ["spiffe://plexus.local/ns/default/sa/tester"]
    to:
      paths: ["/reviews/*"]
      methods: [GET]
      ports: [9080]
  - from:
      namespaces: [monitoring]
      unauthenticated: false
"#;

#[test]
fn authorization_policy() {
    valid(Kind::AuthorizationPolicy, AUTHORIZATION_POLICY);
    valid(Kind::AuthorizationPolicy, &mutate(AUTHORIZATION_POLICY, "    port: 9080\n", "    route: reviews\n"));
    invalid(
        &mutate(AUTHORIZATION_POLICY, "action: allow", "action: permit"),
        "spec.action",
        "unknown variant `permit`",
    );
    invalid(
        &mutate(AUTHORIZATION_POLICY, "\"spiffe://plexus.local/ns/default/sa/tester\"", "tester"),
        "spec.rules[0].from.identities[0]",
        "not a spiffe:// identity",
    );
    invalid(
        &mutate(AUTHORIZATION_POLICY, "\"/reviews/*\"", "reviews"),
        "spec.rules[0].to.paths[0]",
        "must start with '/'",
    );
    // Requests are matched normalized: patterns that could never match are refused.
    invalid(
        &mutate(AUTHORIZATION_POLICY, "\"/reviews/*\"", "\"/public/../reviews/*\""),
        "spec.rules[0].to.paths[0]",
        "write \"/reviews/*\"",
    );
    invalid(
        &mutate(AUTHORIZATION_POLICY, "\"/reviews/*\"", "\"/reviews%5C*\""),
        "spec.rules[0].to.paths[0]",
        "can never match: encoded backslash",
    );
    valid(Kind::AuthorizationPolicy, &mutate(AUTHORIZATION_POLICY, "\"/reviews/*\"", "\"/a%2Fb\""));
    invalid(
        &mutate(AUTHORIZATION_POLICY, "prod/frontend", "prod/front/end"),
        "spec.rules[0].from.serviceAccounts[1]",
        "write NAME or NAMESPACE/NAME",
    );
    invalid(
        &mutate(AUTHORIZATION_POLICY, "kind: Service", "kind: Deployment"),
        "spec.targetRef",
        "kind \"Deployment\" is not supported",
    );
    invalid(&mutate(AUTHORIZATION_POLICY, "  action: allow\n", ""), "spec", "missing field `action`");
}

const RESILIENCE_POLICY: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: ResiliencePolicy
metadata:
  name: reviews
spec:
  targetRef:
    group: plexus.dev
    kind: Service
    name: reviews
  timeouts:
    connect: 1s
    request: 5s
    idle: 5m
  retries:
    attempts: 3
    perTryTimeout: 1s
    on: [5xx, reset, connect-failure, "503", unavailable]
    backoff: 25ms
  retryBudget:
    ratio: 0.2
    minPerSecond: 10
    ttl: 10s
  outlierDetection:
    consecutiveFailures: 5
    interval: 10s
    baseEjectionTime: 30s
    maxEjectionPercent: 50
  connectionLimits:
    maxConnections: 100
    maxPendingRequests: 10
    maxRequestsPerConnection: 1000
  loadBalancer:
    algorithm: ringHash
    hashOn:
      header: x-user
"#;

#[test]
fn resilience_policy() {
    let r = valid(Kind::ResiliencePolicy, RESILIENCE_POLICY);
    let plexus_core::Spec::ResiliencePolicy(spec) = &r.spec else { panic!("a ResiliencePolicy spec") };
    assert_eq!(spec.retries.as_ref().map(|x| x.on.len()), Some(5), "`on` is a field name, not a YAML 1.1 boolean");
    invalid(
        &mutate(RESILIENCE_POLICY, "    hashOn:\n      header: x-user\n", ""),
        "spec.loadBalancer.hashOn",
        "required for ringHash",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "on: [5xx,", "on: [teapot,"),
        "spec.retries.on[0]",
        "\"teapot\" is not a status code",
    );
    invalid(&mutate(RESILIENCE_POLICY, "attempts: 3", "attempts: 0"), "spec.retries.attempts", "between 1 and 10");
    invalid(
        &mutate(RESILIENCE_POLICY, "consecutiveFailures: 5\n", "consecutiveFailures: 5\n    consecutive5xx: 0\n"),
        "spec.outlierDetection.consecutive5xx",
        "must be at least 1",
    );
    let with_5xx =
        mutate(RESILIENCE_POLICY, "consecutiveFailures: 5\n", "consecutiveFailures: 5\n    consecutive5xx: 4\n");
    let r = valid(Kind::ResiliencePolicy, &with_5xx);
    let plexus_core::Spec::ResiliencePolicy(spec) = &r.spec else { panic!("a ResiliencePolicy spec") };
    let od = plexus_core::policy::ClientPolicy::from_spec("default/reviews".into(), spec).outlier_detection;
    assert_eq!((od.consecutive_failures, od.consecutive_5xx), (5, 4));
    assert_eq!(
        plexus_core::explain::describe_outlier(&od),
        "5 consecutive gateway failures or 4 consecutive 5xx, every 10s, eject 30s, at most 50%"
    );
    let default = plexus_core::policy::DEFAULT_OUTLIER;
    assert_eq!(default.consecutive_5xx, 0, "off unless set");
    assert_eq!(
        plexus_core::explain::describe_outlier(&default),
        "7 consecutive gateway failures, every 1s, eject 1s, at most 50%"
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "    name: reviews\n", "    name: reviews\n    route: reviews\n"),
        "spec.targetRef.route",
        "only an AuthorizationPolicy",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "request: 5s", "request: 10 seconds"),
        "spec.timeouts.request",
        "invalid duration",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "maxEjectionPercent: 50", "maxEjectionPercent: 150"),
        "spec.outlierDetection.maxEjectionPercent",
        "between 0 and 100",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "algorithm: ringHash", "algorithm: random"),
        "spec.loadBalancer.algorithm",
        "unknown variant `random`",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "algorithm: ringHash", "algorithm: roundRobin"),
        "spec.loadBalancer.hashOn",
        "only ringHash hashes",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "header: x-user", "header: x-user\n      cookie: session"),
        "spec.loadBalancer.hashOn",
        "set exactly one of",
    );
    invalid(
        &mutate(RESILIENCE_POLICY, "group: plexus.dev", "group: apps"),
        "spec.targetRef",
        "group \"apps\" is not supported",
    );
}

const RATE_LIMIT_POLICY: &str = r#"
apiVersion: plexus.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: productpage
spec:
  targetRef:
    kind: Service
    name: productpage
    port: 9080
  requestsPerSecond: 10
  burst: 20
  overrides:
  - serviceAccounts: [ingress-gateway]
    identities: ["spiffe://plexus.local/ns/default/sa/loadgen"]
    requestsPerSecond: 100
    burst: 200
"#;

#[test]
fn rate_limit_policy() {
    valid(Kind::RateLimitPolicy, RATE_LIMIT_POLICY);
    invalid(
        &mutate(RATE_LIMIT_POLICY, "requestsPerSecond: 10\n", "requestsPerSecond: 0\n"),
        "spec.requestsPerSecond",
        "at least 1",
    );
    invalid(
        &mutate(RATE_LIMIT_POLICY, "requestsPerSecond: 10\n", "requestsPerSecond: ten\n"),
        "spec.requestsPerSecond",
        "invalid type",
    );
    invalid(&mutate(RATE_LIMIT_POLICY, "  requestsPerSecond: 10\n", ""), "spec", "missing field `requestsPerSecond`");
    invalid(
        &mutate(
            RATE_LIMIT_POLICY,
            "  - serviceAccounts: [ingress-gateway]\n    identities: [\"spiffe://plexus.local/ns/default/sa/loadgen\"]\n    requestsPerSecond: 100",
            "  - requestsPerSecond: 100",
        ),
        "spec.overrides[0]",
        "name the sources",
    );
    invalid(&mutate(RATE_LIMIT_POLICY, "burst: 20", "burst: 0"), "spec.burst", "at least 1");
    invalid(&mutate(RATE_LIMIT_POLICY, "port: 9080", "port: 0"), "spec.targetRef.port", "between 1 and 65535");
    invalid(&mutate(RATE_LIMIT_POLICY, "burst: 200", "burst: 0"), "spec.overrides[0].burst", "at least 1");
    invalid(
        &mutate(RATE_LIMIT_POLICY, "\"spiffe://plexus.local/ns/default/sa/loadgen\"", "loadgen"),
        "spec.overrides[0].identities[0]",
        "not a spiffe:// identity",
    );
}

#[test]
fn envelope_errors() {
    invalid(&mutate(SERVICE, "kind: Service", "kind: Deployment"), "kind", "unsupported kind \"Deployment\"");
    invalid(
        &mutate(SERVICE, "apiVersion: plexus.dev/v1alpha1", "apiVersion: v1"),
        "apiVersion",
        "must have apiVersion plexus.dev/v1alpha1",
    );
    invalid(&format!("{SERVICE}extra: 1\n"), "extra", "unknown field");
    invalid(
        &mutate(SERVICE, "  labels: {app: reviews}\n", "  labels: {app: reviews}\n  finalizers: [x]\n"),
        "metadata.finalizers",
        "unknown field",
    );
}

// ---------------------------------------------------------------------------------------------
// atomicity

#[test]
fn one_bad_document_rejects_the_input_with_only_its_errors() {
    let bad = mutate(HTTP_ROUTE, "statusCode: 301", "statusCode: 307");
    let bad = mutate(&bad, "percent: 50", "percent: 150");
    let text = [SERVICE, WORKLOAD, &bad, FAULT_INJECTION, RATE_LIMIT_POLICY].join("---\n");
    let err = parse_documents("bookinfo.yaml", &text).expect_err("one document is invalid");
    assert_eq!(err.errors.len(), 2, "{err}");
    for e in &err.errors {
        assert_eq!(e.document, 3, "{err}");
        assert_eq!(e.file, "bookinfo.yaml");
        assert_eq!(e.object.as_deref(), Some("HTTPRoute default/reviews"));
    }
    assert!(
        err.to_string().contains("bookinfo.yaml, document 3 (HTTPRoute default/reviews), field spec.rules[2]"),
        "{err}"
    );
    // Without the bad document everything is accepted.
    let good = [SERVICE, WORKLOAD, HTTP_ROUTE, FAULT_INJECTION, RATE_LIMIT_POLICY].join("---\n");
    assert_eq!(parse_documents("bookinfo.yaml", &good).expect("valid").len(), 5);
}

// ---------------------------------------------------------------------------------------------
// compilation

fn compile(yaml: &str) -> MeshSnapshot {
    let resources = parse_documents("mesh.yaml", yaml).unwrap_or_else(|e| panic!("valid:\n{e}"));
    MeshSnapshot::compile(&resources, "test")
}

fn table<'a>(snap: &'a MeshSnapshot, authority: &str) -> &'a RouteTable {
    &snap.resolve_authority(authority).unwrap_or_else(|| panic!("{authority} resolves")).1.routes
}

fn find<'a>(t: &'a RouteTable, method: &str, path: &str, headers: &[(&str, &str)]) -> Option<&'a RouteEntry> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(http::HeaderName::from_bytes(k.as_bytes()).expect("name"), v.parse().expect("value"));
    }
    t.find(&RequestInfo { method, path, query: None, headers: &map })
}

const CART: &str = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: cart}\nspec: {ports: [{port: 9090, appProtocol: grpc}]}\n";

#[test]
fn grpc_method_matches_become_path_matchers_with_precedence() {
    let snap = compile(&format!(
        "{CART}---\n{}",
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: cart}
spec:
  parentRefs: [{kind: Service, name: cart}]
  rules:
  - matches: [{method: {service: shop.Cart}}]
    backendRefs: [{name: cart-service-wide}]
  - matches: [{method: {service: shop.Cart, method: AddItem}}]
    backendRefs: [{name: cart-exact}]
  - matches: [{method: {method: Ping}}]
    backendRefs: [{name: cart-any-ping}]
  - matches: [{method: {type: RegularExpression, service: "shop\\.(Cart|Basket)", method: "Get.*"}}]
    backendRefs: [{name: cart-regex}]
  - matches: [{headers: [{name: x-tenant, value: beta}]}]
    backendRefs: [{name: cart-beta}]
"#
    ));
    let t = table(&snap, "cart:9090");
    // Each method match becomes a condition on the `/SERVICE/METHOD` path.
    let mut paths: Vec<String> = t
        .entries
        .iter()
        .map(|e| match &e.matcher.path {
            PathMatcher::Exact(p) => format!("Exact {p}"),
            PathMatcher::PathPrefix(p) => format!("PathPrefix {p}"),
            PathMatcher::RegularExpression(r) => format!("RegularExpression {}", r.as_str()),
        })
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "Exact /shop.Cart/AddItem",
            "PathPrefix /",
            "PathPrefix /shop.Cart",
            "RegularExpression ^(?:/(?:shop\\.(Cart|Basket))/(?:Get.*))$",
            "RegularExpression ^(?:/[^/]+/Ping)$",
        ]
    );
    let backend = |path: &str, headers: &[(&str, &str)]| {
        find(t, "POST", path, headers).map(|e| e.backends[0].service.name.clone()).unwrap_or_default()
    };
    assert_eq!(backend("/shop.Cart/AddItem", &[]), "cart-exact");
    assert_eq!(backend("/shop.Cart/Remove", &[]), "cart-service-wide");
    assert_eq!(backend("/shop.Cart/GetItems", &[]), "cart-regex", "regex beats the service prefix");
    assert_eq!(backend("/shop.Basket/GetAll", &[]), "cart-regex");
    assert_eq!(backend("/grpc.health.v1.Health/Ping", &[]), "cart-any-ping");
    // GRPCRoute precedence (Gateway API): most characters of the service, then of the method,
    // then most headers; so a service-wide match beats a method-only one.
    assert_eq!(backend("/shop.Cart/Ping", &[]), "cart-service-wide", "service characters beat method characters");
    assert_eq!(backend("/shop.Cart/Remove", &[("x-tenant", "beta")]), "cart-service-wide", "then headers");
    assert_eq!(backend("/shop.CartX/AddItem", &[]), "", "a service prefix matches whole segments");
    assert_eq!(backend("/other.Svc/Call", &[("x-tenant", "beta")]), "cart-beta");
}

#[test]
fn traffic_split_with_route_group_routes_like_an_http_route() {
    let snap = compile(
        r#"apiVersion: plexus.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {ports: [{port: 9080}]}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: reviews-api}
spec:
  matches:
  - {name: reads, pathRegex: "/reviews/[0-9]+", methods: [GET, HEAD]}
  - {name: testers, headers: {end-user: "jason|tester"}}
  - {name: unused, pathRegex: "/admin/.*"}
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: reviews-canary}
spec:
  service: reviews
  matches: [{kind: HTTPRouteGroup, name: reviews-api, matches: [reads, testers]}]
  backends: [{service: reviews-v1, weight: 90}, {service: reviews-v2, weight: 10}]
"#,
    );
    let t = table(&snap, "reviews:9080");
    let route = |method: &str, path: &str, headers: &[(&str, &str)]| {
        find(t, method, path, headers).map(|e| e.route.to_string())
    };
    let split = Some("default/reviews-canary".to_string());
    assert_eq!(route("GET", "/reviews/12", &[]), split, "pathRegex + method");
    assert_eq!(route("HEAD", "/reviews/12", &[]), split);
    assert_eq!(route("POST", "/reviews/12", &[]), None, "method not listed");
    assert_eq!(route("GET", "/reviews/12/x", &[]), None, "pathRegex is anchored");
    assert_eq!(route("POST", "/anything", &[("end-user", "tester")]), split, "header regex");
    assert_eq!(route("POST", "/anything", &[("end-user", "testers")]), None, "header regex is anchored");
    assert_eq!(route("GET", "/admin/x", &[]), None, "only the named matches are used");
    let e = find(t, "GET", "/reviews/1", &[]).expect("matches");
    let weights: Vec<(String, u32)> = e.backends.iter().map(|b| (b.service.name.clone(), b.weight)).collect();
    assert_eq!(weights, [("reviews-v1".to_string(), 90), ("reviews-v2".to_string(), 10)]);
    let picks = (0..100).filter(|roll| e.pick_backend(*roll).is_some_and(|b| b.service.name == "reviews-v2")).count();
    assert_eq!(picks, 10);
}

const TWO_PORTS: &str = "apiVersion: plexus.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{name: http, port: 9080}, {name: admin, port: 9443}]}\n";

fn resilience(name: &str, port: Option<u16>, created: &str, request: &str) -> String {
    let port = port.map(|p| format!(", port: {p}")).unwrap_or_default();
    format!(
        "---\napiVersion: plexus.dev/v1alpha1\nkind: ResiliencePolicy\nmetadata: {{name: {name}, creationTimestamp: \"{created}\"}}\nspec:\n  targetRef: {{kind: Service, name: reviews{port}}}\n  timeouts: {{request: {request}}}\n"
    )
}

#[test]
fn resilience_policy_port_specific_beats_service_wide_and_older_beats_newer() {
    let snap = compile(&format!(
        "{TWO_PORTS}{}{}{}",
        resilience("newer-wide", None, "2024-03-01T00:00:00Z", "3s"),
        resilience("older-wide", None, "2024-01-01T00:00:00Z", "2s"),
        resilience("newest-port", Some(9080), "2024-06-01T00:00:00Z", "1s"),
    ));
    let policy = |port: u16| {
        let p = &snap.resolve_authority(&format!("reviews:{port}")).expect("port").1.policy;
        (p.source.clone(), p.request_timeout)
    };
    assert_eq!(policy(9080), (Some("default/newest-port".into()), Some(Duration::from_secs(1))), "port-specific wins");
    assert_eq!(policy(9443), (Some("default/older-wide".into()), Some(Duration::from_secs(2))), "older wins");
    // check names the same winners, with the reason.
    let policies = [
        resilience("newer-wide", None, "2024-03-01T00:00:00Z", "3s"),
        resilience("older-wide", None, "2024-01-01T00:00:00Z", "2s"),
        resilience("newest-port", Some(9080), "2024-06-01T00:00:00Z", "1s"),
    ];
    let resources = parse_documents("m", &format!("{TWO_PORTS}{}", policies.concat())).expect("valid");
    let warnings: Vec<String> = analyze(&resources)
        .into_iter()
        .map(|f| {
            assert_eq!(f.severity, Severity::Warning);
            format!("{}: {}", f.object, f.message)
        })
        .collect();
    let port_wins = "ResiliencePolicy default/newest-port targets it too and wins (it names the port, which beats a Service-wide policy)";
    assert_eq!(
        warnings,
        [
            format!("ResiliencePolicy default/newer-wide: does not apply to Service reviews.default port 9080: {port_wins}"),
            "ResiliencePolicy default/newer-wide: does not apply to Service reviews.default port 9443: ResiliencePolicy default/older-wide targets it too and wins (it was created earlier)".to_string(),
            format!("ResiliencePolicy default/older-wide: does not apply to Service reviews.default port 9080: {port_wins}"),
        ]
    );
}

#[test]
fn rate_limit_policy_attaches_to_its_port() {
    let snap = compile(&format!(
        "{TWO_PORTS}---\n{}",
        "apiVersion: plexus.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: reviews-http}\nspec:\n  targetRef: {kind: Service, name: reviews, port: 9080}\n  requestsPerSecond: 10\n  burst: 20\n  overrides: [{serviceAccounts: [productpage], requestsPerSecond: 50}]\n"
    ));
    let limit = |port: u16| snap.resolve_authority(&format!("reviews:{port}")).expect("port").1.rate_limit.clone();
    let l = limit(9080).expect("the targeted port is limited");
    assert_eq!((l.policy.as_str(), l.requests_per_second, l.burst), ("default/reviews-http", 10, 20));
    assert_eq!(l.overrides[0].identities, ["spiffe://plexus.local/ns/default/sa/productpage"]);
    assert_eq!((l.overrides[0].requests_per_second, l.overrides[0].burst), (50, 50), "burst defaults to the rate");
    assert!(limit(9443).is_none(), "the other port is not limited");
}

#[test]
fn extension_ref_to_a_missing_fault_compiles_to_an_empty_fault_ref() {
    let route = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings}
spec:
  parentRefs: [{kind: Service, name: reviews, port: 9080}]
  rules:
  - matches: [{headers: [{name: end-user, value: jason}]}]
    filters:
    - {type: ExtensionRef, extensionRef: {group: plexus.dev, kind: FaultInjection, name: ratings-delay}}
    backendRefs: [{name: reviews}]
"#;
    let snap = compile(&format!("{TWO_PORTS}---\n{route}"));
    let e = find(table(&snap, "reviews:9080"), "GET", "/", &[("end-user", "jason")]).expect("matches");
    assert_eq!(e.faults.len(), 1);
    assert_eq!(e.faults[0].name, "default/ratings-delay");
    assert!(e.faults[0].fault.is_none(), "missing FaultInjection: {:?}", e.faults[0]);
    let fault = "apiVersion: plexus.dev/v1alpha1\nkind: FaultInjection\nmetadata: {name: ratings-delay}\nspec: {delay: {fixed: 7s}, abort: {grpcStatus: unavailable, percent: 5}}\n";
    let snap = compile(&format!("{TWO_PORTS}---\n{fault}---\n{route}"));
    let e = find(table(&snap, "reviews:9080"), "GET", "/", &[("end-user", "jason")]).expect("matches");
    let f = e.faults[0].fault.as_ref().expect("the FaultInjection exists now");
    let delay = f.delay.as_ref().expect("delay");
    assert_eq!((delay.fixed, delay.percent), (Duration::from_secs(7), 100.0), "percent defaults to 100");
    let abort = f.abort.as_ref().expect("abort");
    assert_eq!((abort.http_status, abort.grpc_status, abort.percent), (None, Some(14), 5.0));
}

#[test]
fn mirror_percent_and_fraction() {
    let route = |mirror: &str| {
        format!(
            "{TWO_PORTS}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: m}}\nspec:\n  parentRefs: [{{name: reviews, port: 9080}}]\n  rules:\n  - filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: reviews-v2, port: 9080}}{mirror}}}}}]\n    backendRefs: [{{name: reviews-v1}}]\n"
        )
    };
    let mirror = |m: &str| {
        let snap = compile(&route(m));
        let e = &table(&snap, "reviews:9080").entries[0];
        assert_eq!(e.mirrors.len(), 1);
        assert_eq!((e.mirrors[0].service.name.as_str(), e.mirrors[0].port), ("reviews-v2", Some(9080)));
        e.mirrors[0].percent
    };
    assert_eq!(mirror(""), 100.0, "all requests by default");
    assert_eq!(mirror(", percent: 30"), 30.0);
    assert_eq!(mirror(", fraction: {numerator: 1, denominator: 4}"), 25.0);
    assert_eq!(mirror(", fraction: {numerator: 5}"), 5.0, "denominator defaults to 100");
    invalid(
        &route(", percent: 30, fraction: {numerator: 1}").replacen(TWO_PORTS, "", 1).replacen("---\n", "", 1),
        "spec.rules[0].filters[0].requestMirror",
        "percent or fraction, not both",
    );
}

// ---------------------------------------------------------------------------------------------
// the shipped examples

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("readable examples dir").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(p);
        }
    }
}

fn load(path: &Path) -> Vec<Resource> {
    let text = std::fs::read_to_string(path).expect("readable example");
    parse_documents(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_example_parses_and_adds_no_check_errors_to_bookinfo() {
    let dir = examples_dir();
    let mut files = Vec::new();
    yaml_files(&dir, &mut files);
    // examples/kubernetes holds Kubernetes manifests (Deployments, core Services) for kubectl,
    // not Plexus resources: the Kubernetes end-to-end tests apply them to a real API server.
    files.retain(|f| !f.starts_with(dir.join("kubernetes")));
    let bookinfo_path = dir.join("bookinfo/bookinfo.yaml");
    assert!(files.contains(&bookinfo_path), "{files:?}");
    // The walk-throughs SPEC §9 lists.
    for name in [
        "route-all-v1.yaml",
        "route-80-20.yaml",
        "route-jason-v3.yaml",
        "fault-delay-ratings.yaml",
        "ratings-timeout.yaml",
        "fault-abort-ratings.yaml",
        "retries-timeouts.yaml",
        "circuit-breaking.yaml",
        "mirroring.yaml",
        "rate-limit.yaml",
        "mtls-strict.yaml",
        "authz-reviews.yaml",
    ] {
        assert!(files.contains(&dir.join("bookinfo").join(name)), "examples/bookinfo/{name} is missing");
    }
    let bookinfo = load(&bookinfo_path);
    for file in &files {
        let resources = load(file);
        assert!(!resources.is_empty(), "{} holds no resource", file.display());
        if *file == bookinfo_path {
            continue;
        }
        let mut all = bookinfo.clone();
        all.extend(resources);
        let errors: Vec<String> = analyze(&all)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| format!("{}: {} (hint: {})", f.object, f.message, f.hint))
            .collect();
        assert!(errors.is_empty(), "bookinfo.yaml + {}:\n{}", file.display(), errors.join("\n"));
    }
    assert!(analyze(&bookinfo).is_empty(), "bookinfo.yaml alone is clean");
}
