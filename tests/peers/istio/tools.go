//go:build tools

// Package tools pins the Istio commands that tests/peers/istio.sh builds (istiod and the
// sidecar's agent), so that `go mod tidy` keeps their whole dependency graph in go.mod and
// go.sum.
package tools

import (
	_ "istio.io/istio/pilot/cmd/pilot-agent"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
