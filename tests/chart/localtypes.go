package main

// Two kinds the chart renders are not Kubernetes built-ins, and their Go API modules are not
// reachable from the Go module proxy this project builds from (spire-controller-manager and
// openshift/api answer 403). They are checked against the structs below: our own
// transcription of the documented fields, the ones a chart could plausibly set. Strict
// decoding into them still turns a misspelt field into an error; a field they lack fails
// the test, which is the cue to add it here after checking the upstream API reference.

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var localTypes = map[schema.GroupVersionKind]func() any{
	{Group: "spire.spiffe.io", Version: "v1alpha1", Kind: "ClusterSPIFFEID"}: func() any {
		return &clusterSPIFFEID{}
	},
	{Group: "security.openshift.io", Version: "v1", Kind: "SecurityContextConstraints"}: func() any {
		return &securityContextConstraints{}
	},
}

// clusterSPIFFEID: spire-controller-manager's spire.spiffe.io/v1alpha1 ClusterSPIFFEID.
type clusterSPIFFEID struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`
	Spec              struct {
		SPIFFEIDTemplate          string                `json:"spiffeIDTemplate"`
		TTL                       *metav1.Duration      `json:"ttl,omitempty"`
		JWTTTL                    *metav1.Duration      `json:"jwtTtl,omitempty"`
		DNSNameTemplates          []string              `json:"dnsNameTemplates,omitempty"`
		WorkloadSelectorTemplates []string              `json:"workloadSelectorTemplates,omitempty"`
		FederatesWith             []string              `json:"federatesWith,omitempty"`
		NamespaceSelector         *metav1.LabelSelector `json:"namespaceSelector,omitempty"`
		PodSelector               *metav1.LabelSelector `json:"podSelector,omitempty"`
		Admin                     bool                  `json:"admin,omitempty"`
		Downstream                bool                  `json:"downstream,omitempty"`
		AutoPopulateDNSNames      bool                  `json:"autoPopulateDNSNames,omitempty"`
		ClassName                 string                `json:"className,omitempty"`
		Fallback                  bool                  `json:"fallback,omitempty"`
		Hint                      string                `json:"hint,omitempty"`
	} `json:"spec"`
}

// securityContextConstraints: OpenShift's security.openshift.io/v1 SCC (fields at the top
// level, no spec).
type securityContextConstraints struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata"`

	Priority                        *int32              `json:"priority"`
	AllowPrivilegedContainer        bool                `json:"allowPrivilegedContainer"`
	DefaultAddCapabilities          []corev1.Capability `json:"defaultAddCapabilities"`
	RequiredDropCapabilities        []corev1.Capability `json:"requiredDropCapabilities"`
	AllowedCapabilities             []corev1.Capability `json:"allowedCapabilities"`
	Volumes                         []string            `json:"volumes"`
	AllowedFlexVolumes              []map[string]string `json:"allowedFlexVolumes,omitempty"`
	AllowHostDirVolumePlugin        bool                `json:"allowHostDirVolumePlugin"`
	AllowHostNetwork                bool                `json:"allowHostNetwork"`
	AllowHostPorts                  bool                `json:"allowHostPorts"`
	AllowHostPID                    bool                `json:"allowHostPID"`
	AllowHostIPC                    bool                `json:"allowHostIPC"`
	DefaultAllowPrivilegeEscalation *bool               `json:"defaultAllowPrivilegeEscalation,omitempty"`
	AllowPrivilegeEscalation        *bool               `json:"allowPrivilegeEscalation,omitempty"`
	SELinuxContext                  sccStrategy         `json:"seLinuxContext"`
	RunAsUser                       sccStrategy         `json:"runAsUser"`
	SupplementalGroups              sccStrategy         `json:"supplementalGroups"`
	FSGroup                         sccStrategy         `json:"fsGroup"`
	ReadOnlyRootFilesystem          bool                `json:"readOnlyRootFilesystem"`
	Users                           []string            `json:"users"`
	Groups                          []string            `json:"groups"`
	SeccompProfiles                 []string            `json:"seccompProfiles,omitempty"`
	AllowedUnsafeSysctls            []string            `json:"allowedUnsafeSysctls,omitempty"`
	ForbiddenSysctls                []string            `json:"forbiddenSysctls,omitempty"`
	UserNamespaceLevel              string              `json:"userNamespaceLevel,omitempty"`
}

// sccStrategy covers the four strategy blocks; they share `type` and differ in the rest.
type sccStrategy struct {
	Type           string                 `json:"type,omitempty"`
	SELinuxOptions *corev1.SELinuxOptions `json:"seLinuxOptions,omitempty"`
	UID            *int64                 `json:"uid,omitempty"`
	UIDRangeMin    *int64                 `json:"uidRangeMin,omitempty"`
	UIDRangeMax    *int64                 `json:"uidRangeMax,omitempty"`
	Ranges         []struct {
		Min int64 `json:"min"`
		Max int64 `json:"max"`
	} `json:"ranges,omitempty"`
}
