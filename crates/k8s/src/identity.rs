//! Workload identity from Kubernetes ServiceAccount tokens: a `TokenReview` turns a pod's
//! token into `system:serviceaccount:NS:SA`, and that into `spiffe://<td>/ns/NS/sa/SA`.
