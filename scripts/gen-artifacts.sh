#!/usr/bin/env bash
# Regenerates the committed artifacts that are derived from the Rust code: the CRD
# and the Helm chart's copy of it, and the charts' versions (the workspace version).
# Tests fail when what is committed differs from what this writes.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$IOT_REPO"
op=(cargo run -q -p iot-operator --)
"${op[@]}" crd >deploy/crd/iot.nationtech.io.yaml
"${op[@]}" crd --helm-template >deploy/chart/iot-operator/templates/crd.yaml
version=$(cargo metadata --no-deps --format-version 1 \
  | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="iot-operator"))')
for chart in iot-operator iot-nats; do
  sed -i -E "s/^version: .*/version: $version/; s/^appVersion: .*/appVersion: \"$version\"/" "deploy/chart/$chart/Chart.yaml"
done
step "CRD and charts regenerated (version $version)"
