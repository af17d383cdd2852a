package main

// install and uninstall: `helm install` / `helm uninstall` of the chart through Helm's action
// package, against the cluster of a kubeconfig (the end-to-end tests' real node,
// tests/k8s_node.rs). Usage:
//
//	chart-check install --kubeconfig FILE [--namespace NS] [--release NAME] [-f values.yaml]...
//	                    [--set[-string] k=v]... CHART_DIR
//	chart-check uninstall --kubeconfig FILE [--namespace NS] [--release NAME]
//
// Neither waits for the release's workloads (the test node has no DaemonSet controller):
// the caller waits for what it expects to see. Release records are Secrets, as with helm.

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"helm.sh/helm/v4/pkg/action"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/kube"
	"k8s.io/cli-runtime/pkg/genericclioptions"
)

func actionConfig(kubeconfig, namespace string) (*action.Configuration, error) {
	if kubeconfig == "" {
		return nil, errors.New("--kubeconfig is required")
	}
	flags := genericclioptions.NewConfigFlags(true)
	flags.KubeConfig = &kubeconfig
	flags.Namespace = &namespace
	cfg := action.NewConfiguration()
	cfg.SetLogger(slog.New(slog.NewTextHandler(io.Discard, nil)).Handler())
	if err := cfg.Init(flags, namespace, "secret"); err != nil {
		return nil, err
	}
	return cfg, nil
}

func install(args []string) error {
	fs := flag.NewFlagSet("install", flag.ContinueOnError)
	rel := addReleaseFlags(fs)
	namespace, release := rel.namespace, rel.release
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the cluster")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("install needs exactly one CHART_DIR")
	}
	vals, err := rel.values()
	if err != nil {
		return err
	}
	chrt, err := loader.Load(fs.Arg(0))
	if err != nil {
		return fmt.Errorf("loading chart: %w", err)
	}
	cfg, err := actionConfig(*kubeconfig, *namespace)
	if err != nil {
		return err
	}
	inst := action.NewInstall(cfg)
	inst.Namespace = *namespace
	inst.ReleaseName = *release
	inst.WaitStrategy = kube.HookOnlyStrategy
	inst.Timeout = 2 * time.Minute
	if _, err := inst.Run(chrt, vals); err != nil {
		return fmt.Errorf("helm install %s: %w", *release, err)
	}
	fmt.Printf("installed release %s in namespace %s\n", *release, *namespace)
	return nil
}

func uninstall(args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
	namespace := fs.String("namespace", "spire-system", "release namespace")
	release := fs.String("release", "svid-bridge", "release name")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the cluster")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg, err := actionConfig(*kubeconfig, *namespace)
	if err != nil {
		return err
	}
	u := action.NewUninstall(cfg)
	u.WaitStrategy = kube.HookOnlyStrategy
	u.Timeout = 2 * time.Minute
	if _, err := u.Run(*release); err != nil {
		return fmt.Errorf("helm uninstall %s: %w", *release, err)
	}
	fmt.Printf("uninstalled release %s from namespace %s\n", *release, *namespace)
	return nil
}
