#!/usr/bin/env bash
# Builds the Kubernetes v1.20.2 control-plane binaries the tests use (kube-apiserver,
# kube-controller-manager, kube-scheduler) from Debian's own source package of Kubernetes
# (the one Debian builds kubectl from), with no network access beyond the Debian archive
# this machine is configured for. About 15 minutes and 1.5 GB of disk on 2 cores.
# `make kube-bin` runs it where no prebuilt copy (shared/kube) is at hand.
#
# usage: tests/support/kube_build.sh OUT_DIR
set -euo pipefail
out=${1:?usage: $0 OUT_DIR}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
apt-get install -y -q --no-install-recommends golang-go rsync jq dpkg-dev >/dev/null
# A private source list: the machine's own Debian archive, as deb-src, for bookworm main.
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list)
mkdir -p "$work/apt/lists/partial"
echo "deb-src $uri bookworm main" > "$work/apt/sources.list"
apt_opts=(-o Dir::Etc::SourceList="$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$work/apt/lists")
apt-get "${apt_opts[@]}" update -q >/dev/null
(cd "$work" && apt-get "${apt_opts[@]}" source --download-only kubernetes >/dev/null)
tar -xzf "$work"/kubernetes_*.orig.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
cd "$src"
export GOPATH=$PWD/.go CGO_ENABLED=0 GOPROXY=off HOME=$work
mkdir -p .go/src/k8s.io && ln -sfn "$PWD" .go/src/k8s.io/kubernetes
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler"
mkdir -p "$out"
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager _output/bin/kube-scheduler "$out/"
echo "built into $out"
