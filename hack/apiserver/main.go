// iot-apiserver: a CRD-only Kubernetes API server for development and tests.
//
// It is upstream k8s.io/apiextensions-apiserver (the code every real cluster runs for
// CustomResourceDefinitions) with a different main, so that it stands on its own
// without a core kube-apiserver behind it:
//   - authentication is client certificates only (the O=system:masters group is
//     always allowed), with no TokenReview/SubjectAccessReview delegation;
//   - no admission plugins and no priority-and-fairness (both need the core API);
//   - /apis discovery is switched back on and CRD groups are added to it, so kubectl
//     and kube-rs Discovery can map resources (in a real cluster the aggregator does
//     this);
//   - OpenAPI v2 and v3 are published, so CRD schemas reach `kubectl explain`;
//   - /api answers with an empty version list instead of 404.
package main

import (
	goflag "flag"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/spf13/pflag"
	noopoteltrace "go.opentelemetry.io/otel/trace/noop"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1beta1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	genericoptions "k8s.io/apiserver/pkg/server/options"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/apiserver/pkg/util/webhook"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

const etcdPathPrefix = "/registry/apiextensions.kubernetes.io"

func main() {
	if err := run(); err != nil {
		fmt.Fprintf(os.Stderr, "iot-apiserver: %v\n", err)
		os.Exit(1)
	}
}

func run() error {
	runOpts := genericoptions.NewServerRunOptions()
	rec := genericoptions.NewRecommendedOptions(etcdPathPrefix,
		apiserver.Codecs.LegacyCodec(v1beta1.SchemeGroupVersion, apiextensionsv1.SchemeGroupVersion))
	// Everything below needs a core kube-apiserver, which this server does not have.
	rec.CoreAPI = nil
	rec.Admission = nil
	rec.Features.EnablePriorityAndFairness = false
	rec.Authentication.RemoteKubeConfigFileOptional = true
	rec.Authentication.SkipInClusterLookup = true
	rec.Authorization.RemoteKubeConfigFileOptional = true
	apiEnablement := genericoptions.NewAPIEnablementOptions()

	fs := pflag.NewFlagSet("iot-apiserver", pflag.ExitOnError)
	runOpts.AddUniversalFlags(fs)
	rec.Etcd.AddFlags(fs)
	rec.SecureServing.AddFlags(fs)
	rec.Authentication.AddFlags(fs)
	rec.Authorization.AddFlags(fs)
	klog.InitFlags(nil)
	fs.AddGoFlagSet(goflag.CommandLine)
	if err := fs.Parse(os.Args[1:]); err != nil {
		return err
	}
	if err := runOpts.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}
	if err := runOpts.Complete(); err != nil {
		return err
	}
	var errs []error
	errs = append(errs, runOpts.Validate()...)
	errs = append(errs, rec.Validate()...)
	errs = append(errs, apiEnablement.Validate(apiserver.Scheme)...)
	if len(errs) > 0 {
		return fmt.Errorf("invalid flags: %v", errs)
	}

	serverConfig := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	if err := runOpts.ApplyTo(&serverConfig.Config); err != nil {
		return err
	}
	if err := rec.ApplyTo(serverConfig); err != nil {
		return err
	}
	if err := apiEnablement.ApplyTo(&serverConfig.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return err
	}
	defs := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme)
	serverConfig.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(defs, namer)
	serverConfig.OpenAPIConfig.Info.Title = "iot-apiserver"
	serverConfig.OpenAPIConfig.Info.Version = "v1.36"
	serverConfig.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(defs, namer)
	serverConfig.OpenAPIV3Config.Info.Title = "iot-apiserver"
	serverConfig.OpenAPIV3Config.Info.Version = "v1.36"

	config := &apiserver.Config{
		GenericConfig: serverConfig,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*rec.Etcd, serverConfig.ResourceTransformers, serverConfig.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
			AuthResolverWrapper:  webhook.NewDefaultAuthenticationInfoResolverWrapper(nil, nil, serverConfig.LoopbackClientConfig, noopoteltrace.NewTracerProvider()),
		},
	}
	completed := config.Complete()
	// apiextensions turns root discovery off because the aggregator normally serves it.
	completed.GenericConfig.EnableDiscovery = true
	server, err := completed.New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	generic := server.GenericAPIServer

	generic.Handler.NonGoRestfulMux.HandleFunc("/api", serveEmptyLegacyAPI)
	generic.Handler.NonGoRestfulMux.HandleFunc("/api/", serveEmptyLegacyAPI)

	// Keep the unaggregated /apis list in step with the CRDs, as the aggregator would.
	crdInformer := server.Informers.Apiextensions().V1().CustomResourceDefinitions().Informer()
	sync := func() { syncDiscoveryGroups(generic, crdInformer.GetStore()) }
	if _, err := crdInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(interface{}) { sync() },
		UpdateFunc: func(interface{}, interface{}) { sync() },
		DeleteFunc: func(interface{}) { sync() },
	}); err != nil {
		return err
	}

	ctx := genericapiserver.SetupSignalContext()
	return generic.PrepareRun().RunWithContext(ctx)
}

// knownGroups remembers which CRD groups this process added, so that deleting the
// last CRD of a group removes the group again without touching built-in groups.
var knownGroups = map[string]bool{}

func syncDiscoveryGroups(s *genericapiserver.GenericAPIServer, store cache.Store) {
	groups := map[string]*metav1.APIGroup{}
	for _, obj := range store.List() {
		crd, ok := obj.(*apiextensionsv1.CustomResourceDefinition)
		if !ok {
			continue
		}
		g := groups[crd.Spec.Group]
		if g == nil {
			g = &metav1.APIGroup{Name: crd.Spec.Group}
			groups[crd.Spec.Group] = g
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served {
				continue
			}
			gv := metav1.GroupVersionForDiscovery{GroupVersion: crd.Spec.Group + "/" + v.Name, Version: v.Name}
			dup := false
			for _, have := range g.Versions {
				dup = dup || have.Version == v.Name
			}
			if !dup {
				g.Versions = append(g.Versions, gv)
			}
			if v.Storage {
				g.PreferredVersion = gv
			}
		}
	}
	for name, g := range groups {
		if len(g.Versions) == 0 {
			continue
		}
		if g.PreferredVersion.Version == "" {
			g.PreferredVersion = g.Versions[0]
		}
		s.DiscoveryGroupManager.AddGroup(*g)
		knownGroups[name] = true
	}
	for name := range knownGroups {
		if g, ok := groups[name]; !ok || len(g.Versions) == 0 {
			s.DiscoveryGroupManager.RemoveGroup(name)
			delete(knownGroups, name)
		}
	}
}

// serveEmptyLegacyAPI answers /api: this server has no core group, but clients
// (kube-rs Discovery, kubectl) treat a 404 there as a broken server.
func serveEmptyLegacyAPI(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/api" && r.URL.Path != "/api/" {
		http.NotFound(w, r)
		return
	}
	if strings.Contains(r.Header.Get("Accept"), "apidiscovery.k8s.io") {
		w.Header().Set("Content-Type", "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList")
		_, _ = w.Write([]byte(`{"kind":"APIGroupDiscoveryList","apiVersion":"apidiscovery.k8s.io/v2","metadata":{},"items":[]}`))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"kind":"APIVersions","versions":[],"serverAddressByClientCIDRs":[]}`))
}

// noServices resolves no Service: conversion webhooks are not supported here
// because there is no core API to hold Services.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: this API server has no core API, so webhook services cannot be resolved", namespace, name)
}
