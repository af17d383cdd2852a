// chart-check renders the svid-bridge Helm chart the way `helm install` would (values
// coalesced, values.schema.json enforced, templates rendered in strict mode), runs Helm's
// own chart linter, and decodes every rendered document strictly against the real Kubernetes
// API types: an unknown or misspelt field, a duplicate field or an unknown kind is an error.
//
// install and uninstall (install.go) run helm install/uninstall through Helm's action
// package against a kubeconfig's cluster: the end-to-end tests' real node (tests/k8s_node.rs).
//
// It is a test tool for tests/deploy_chart.rs (built by tests/peers/install.sh into
// target/peers/bin/chart-check), not something users run. Usage:
//
//	chart-check render [-f values.yaml]... [--set[-string] k=v]... [--namespace NS] [--release NAME]
//	                   [--kube-version V] CHART_DIR
//	chart-check istio-template [--native] [--annotations JSON] FILE
//	chart-check decode FILE...
//	chart-check install --kubeconfig FILE [--namespace NS] [--release NAME] [-f ...] [--set ...] CHART_DIR
//	chart-check uninstall --kubeconfig FILE [--namespace NS] [--release NAME]
//	chart-check version
//
// render prints one JSON object: {"objects": [...], "notes": "..."} where every object went
// through the typed decoder and back, so the caller asserts on what the API server would
// store, not on template text. Failures go to stderr with exit status 1.
//
// decode checks plain manifests (deploy/) the same way: every document strictly decoded,
// printed as {"objects": [...]}.
//
// go.sum is committed complete and the build runs with -mod=readonly, like tests/peers/: after
// changing go.mod, regenerate it with `GOSUMDB=off GOFLAGS=-mod=mod go mod tidy` (the
// checksum database is not reachable from this project's machines; go.sum still pins every
// module's hash).
//
// istio-template renders the `spire` injection template from an IstioOperator (or istiod
// Helm values) file with the fields Istio's injector offers it, and decodes the result
// strictly as a Pod: the template must produce a valid pod-spec fragment in both the
// classic-sidecar and the native-sidecar shape.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime/debug"
	"sort"
	"strings"
	"text/template"

	"helm.sh/helm/v4/pkg/chart/common"
	chartutil "helm.sh/helm/v4/pkg/chart/common/util"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	chartv2util "helm.sh/helm/v4/pkg/chart/v2/util"
	"helm.sh/helm/v4/pkg/engine"
	releaseutil "helm.sh/helm/v4/pkg/release/v1/util"
	"helm.sh/helm/v4/pkg/strvals"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8sjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	"k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/yaml"
)

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: chart-check render|istio-template|decode|install|uninstall|version ..."))
	}
	var err error
	switch os.Args[1] {
	case "render":
		err = render(os.Args[2:])
	case "istio-template":
		err = istioTemplate(os.Args[2:])
	case "install":
		err = install(os.Args[2:])
	case "uninstall":
		err = uninstall(os.Args[2:])
	case "decode":
		err = decodeFiles(os.Args[2:])
	case "version":
		fmt.Println(versions())
	default:
		err = fmt.Errorf("unknown command %q (render, istio-template, decode, install, uninstall, version)", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

// versions: the Helm and Kubernetes API module versions this binary was built with.
func versions() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	want := map[string]string{"helm.sh/helm/v4": "helm", "k8s.io/api": "k8s.io/api"}
	var parts []string
	for _, dep := range info.Deps {
		if label, ok := want[dep.Path]; ok {
			parts = append(parts, label+" "+dep.Version)
		}
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "chart-check: %v\n", err)
	os.Exit(1)
}

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

// userValues merges user-supplied values as helm does: files in order, then --set, then
// --set-string.
// releaseFlags are the flags render and install share: the release and the user's values,
// given as helm takes them.
type releaseFlags struct {
	valueFiles, sets, setStrings multiFlag
	namespace, release           *string
}

func addReleaseFlags(fs *flag.FlagSet) *releaseFlags {
	r := &releaseFlags{}
	fs.Var(&r.valueFiles, "f", "values file (repeatable, later wins)")
	fs.Var(&r.sets, "set", "key=value as with helm --set (repeatable)")
	fs.Var(&r.setStrings, "set-string", "key=value as with helm --set-string (repeatable)")
	r.namespace = fs.String("namespace", "spire-system", "release namespace")
	r.release = fs.String("release", "svid-bridge", "release name")
	return r
}

func (r *releaseFlags) values() (map[string]any, error) {
	return userValues(r.valueFiles, r.sets, r.setStrings)
}

func userValues(valueFiles, sets, setStrings []string) (map[string]any, error) {
	userVals := map[string]any{}
	for _, f := range valueFiles {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		vals, err := loader.LoadValues(bytes.NewReader(data))
		if err != nil {
			return nil, fmt.Errorf("values file %s: %w", f, err)
		}
		userVals = loader.MergeMaps(userVals, vals)
	}
	for _, s := range sets {
		if err := strvals.ParseInto(s, userVals); err != nil {
			return nil, fmt.Errorf("--set %s: %w", s, err)
		}
	}
	for _, s := range setStrings {
		if err := strvals.ParseIntoString(s, userVals); err != nil {
			return nil, fmt.Errorf("--set-string %s: %w", s, err)
		}
	}
	return userVals, nil
}

func render(args []string) error {
	fs := flag.NewFlagSet("render", flag.ContinueOnError)
	rel := addReleaseFlags(fs)
	namespace, release := rel.namespace, rel.release
	kubeVersion := fs.String("kube-version", "v1.33.0", "Kubernetes version the chart is rendered for")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("render needs exactly one CHART_DIR")
	}
	chartDir := fs.Arg(0)

	userVals, err := rel.values()
	if err != nil {
		return err
	}

	chrt, err := loader.Load(chartDir)
	if err != nil {
		return fmt.Errorf("loading chart: %w", err)
	}
	kv, err := common.ParseKubeVersion(*kubeVersion)
	if err != nil {
		return err
	}
	caps := common.DefaultCapabilities.Copy()
	caps.KubeVersion = *kv

	// As `helm install` does before rendering: Chart.yaml's kubeVersion must admit the cluster.
	if chrt.Metadata.KubeVersion != "" && !chartv2util.IsCompatibleRange(chrt.Metadata.KubeVersion, caps.KubeVersion.String()) {
		return fmt.Errorf("chart requires kubeVersion: %s which is incompatible with Kubernetes %s",
			chrt.Metadata.KubeVersion, caps.KubeVersion.Version)
	}
	// Schema validation happens here, as in `helm install`/`helm template`.
	renderVals, err := chartutil.ToRenderValuesWithSchemaValidation(chrt, userVals,
		common.ReleaseOptions{Name: *release, Namespace: *namespace, IsInstall: true, Revision: 1},
		caps, false)
	if err != nil {
		return err
	}
	// Strict: a template that reads a value missing from values.yaml is an error, so
	// values.yaml (and the schema derived from it) stays the complete list of knobs.
	eng := engine.Engine{Strict: true}
	files, err := eng.Render(chrt, renderVals)
	if err != nil {
		return fmt.Errorf("rendering: %w", err)
	}

	// `helm lint --strict` with the same values: warnings fail too.
	linter := lint.RunAll(chartDir, userVals, *namespace, lint.WithKubeVersion(kv))
	var lintProblems []string
	for _, m := range linter.Messages {
		if m.Severity >= support.WarningSev {
			lintProblems = append(lintProblems, m.Error())
		}
	}
	if len(lintProblems) > 0 {
		return fmt.Errorf("helm lint:\n  %s", strings.Join(lintProblems, "\n  "))
	}

	out := struct {
		Objects []json.RawMessage `json:"objects"`
		Notes   string            `json:"notes"`
	}{Objects: []json.RawMessage{}}
	names := make([]string, 0, len(files))
	for name := range files {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		content := files[name]
		if strings.HasSuffix(name, "NOTES.txt") {
			out.Notes = content
			continue
		}
		if !strings.HasSuffix(name, ".yaml") && !strings.HasSuffix(name, ".yml") {
			continue
		}
		docs := releaseutil.SplitManifests(content)
		keys := make([]string, 0, len(docs))
		for k := range docs {
			keys = append(keys, k)
		}
		sort.Sort(releaseutil.BySplitManifestsOrder(keys))
		for _, k := range keys {
			doc := docs[k]
			if isEmptyDoc(doc) {
				continue
			}
			obj, err := decodeStrict([]byte(doc), *namespace)
			if err != nil {
				return fmt.Errorf("%s: %w\n--- document ---\n%s", name, err, doc)
			}
			out.Objects = append(out.Objects, obj)
		}
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

// isEmptyDoc: only comments and blank lines (a disabled template renders to that).
func isEmptyDoc(doc string) bool {
	for _, line := range strings.Split(doc, "\n") {
		t := strings.TrimSpace(line)
		if t != "" && !strings.HasPrefix(t, "#") {
			return false
		}
	}
	return true
}

// clusterScoped lists the kinds the chart may render that have no namespace.
var clusterScoped = map[string]bool{
	"CSIDriver":                  true,
	"ClusterRole":                true,
	"ClusterRoleBinding":         true,
	"SecurityContextConstraints": true,
	"ClusterSPIFFEID":            true,
}

var strictSerializer = k8sjson.NewSerializerWithOptions(k8sjson.DefaultMetaFactory, scheme.Scheme, scheme.Scheme,
	k8sjson.SerializerOptions{Yaml: true, Strict: true})

// decodeStrict decodes one document into its typed Go object (unknown fields, duplicate
// fields and unknown kinds are errors), checks the namespace convention, and returns the
// typed object re-encoded as JSON.
func decodeStrict(doc []byte, namespace string) (json.RawMessage, error) {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return nil, fmt.Errorf("not YAML: %w", err)
	}
	if meta.Metadata.Name == "" {
		return nil, fmt.Errorf("%s %s without metadata.name", meta.APIVersion, meta.Kind)
	}
	if clusterScoped[meta.Kind] {
		if meta.Metadata.Namespace != "" {
			return nil, fmt.Errorf("cluster-scoped %s %q has a namespace", meta.Kind, meta.Metadata.Name)
		}
	} else if namespace != anyNamespace && meta.Metadata.Namespace != namespace {
		// Namespaced objects name their namespace explicitly so that `helm template | kubectl
		// apply` lands them in the release namespace too (helm-charts-hardened convention).
		return nil, fmt.Errorf("%s %q: metadata.namespace is %q, want the release namespace %q",
			meta.Kind, meta.Metadata.Name, meta.Metadata.Namespace, namespace)
	}

	gv, err := schema.ParseGroupVersion(meta.APIVersion)
	if err != nil {
		return nil, err
	}
	if local, ok := localTypes[gv.WithKind(meta.Kind)]; ok {
		obj := local()
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			return nil, fmt.Errorf("%s %s: %w", meta.APIVersion, meta.Kind, err)
		}
		return json.Marshal(obj)
	}
	obj, gvk, err := strictSerializer.Decode(doc, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s %q: %w", meta.APIVersion, meta.Kind, meta.Metadata.Name, err)
	}
	if _, ok := obj.(runtime.Unstructured); ok {
		return nil, fmt.Errorf("%s: no typed decoding", gvk)
	}
	return json.Marshal(obj)
}

func decodeFiles(files []string) error {
	if len(files) == 0 {
		return errors.New("decode needs at least one FILE")
	}
	out := struct {
		Objects []json.RawMessage `json:"objects"`
	}{Objects: []json.RawMessage{}}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		docs := releaseutil.SplitManifests(string(data))
		keys := make([]string, 0, len(docs))
		for k := range docs {
			keys = append(keys, k)
		}
		sort.Sort(releaseutil.BySplitManifestsOrder(keys))
		for _, k := range keys {
			if isEmptyDoc(docs[k]) {
				continue
			}
			// anyNamespace: example manifests leave the namespace to `kubectl -n`.
			obj, err := decodeStrict([]byte(docs[k]), anyNamespace)
			if err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
			out.Objects = append(out.Objects, obj)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}

// anyNamespace turns off decodeStrict's namespace check.
const anyNamespace = "\x00any"

// ---------------------------------------------------------------- istio-template ----

func istioTemplate(args []string) error {
	fs := flag.NewFlagSet("istio-template", flag.ContinueOnError)
	native := fs.Bool("native", false, "render as Istio does with native sidecars on")
	name := fs.String("template", "spire", "template name under sidecarInjectorWebhook.templates")
	annotations := fs.String("annotations", "", "pod annotations as JSON, e.g. {\"sidecar.istio.io/nativeSidecar\":\"true\"}")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return errors.New("istio-template needs exactly one FILE")
	}
	data, err := os.ReadFile(fs.Arg(0))
	if err != nil {
		return err
	}
	// Both shapes carry the templates under values.sidecarInjectorWebhook.templates: an
	// IstioOperator has it under spec, istiod's Helm values at the top.
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return err
	}
	values := doc
	if spec, ok := doc["spec"].(map[string]any); ok {
		values, _ = spec["values"].(map[string]any)
	}
	injector, _ := values["sidecarInjectorWebhook"].(map[string]any)
	templates, _ := injector["templates"].(map[string]any)
	text, ok := templates[*name].(string)
	if !ok {
		return fmt.Errorf("%s: no sidecarInjectorWebhook.templates.%s string", fs.Arg(0), *name)
	}
	anns := map[string]string{}
	if *annotations != "" {
		if err := json.Unmarshal([]byte(*annotations), &anns); err != nil {
			return err
		}
	}
	// The subset of Istio's injection data and functions (pkg/kube/inject) that our
	// template may use; a template using anything else fails here, on purpose.
	funcs := template.FuncMap{
		// Istio's `default` takes (default, value).
		"default": func(def, val string) string {
			if val == "" {
				return def
			}
			return val
		},
	}
	tmpl, err := template.New(*name).Option("missingkey=error").Funcs(funcs).Parse(text)
	if err != nil {
		return err
	}
	data2 := map[string]any{
		"ObjectMeta":     map[string]any{"Annotations": anns, "Labels": map[string]string{}},
		"NativeSidecars": *native,
	}
	var buf bytes.Buffer
	if err := tmpl.Execute(&buf, data2); err != nil {
		return err
	}
	// The result is a Pod fragment (metadata + spec) that Istio merges into the pod.
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(buf.Bytes(), &pod); err != nil {
		return fmt.Errorf("rendered template is not a strict Pod fragment: %w\n%s", err, buf.String())
	}
	return json.NewEncoder(os.Stdout).Encode(pod)
}
