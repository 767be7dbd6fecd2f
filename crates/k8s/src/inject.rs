//! Sidecar injection: the pod mutation that adds the Plexus proxy and its init step
//! (owned by the inject engineer).
