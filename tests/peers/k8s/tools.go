//go:build tools

// Package tools pins the Kubernetes commands that tests/peers/k8s.sh builds, so that
// `go mod tidy` keeps their whole dependency graph in go.mod and go.sum.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
