#!/usr/bin/env bash
# Builds the two images with the tags the Kubernetes manifests use (deploy/k8s): the version comes
# from pyproject.toml, so a release bump changes code, images and manifests together (tests/deploy
# checks that the manifests name these tags).
#   deploy/docker/build.sh [REGISTRY]     e.g. deploy/docker/build.sh registry.example.com/retrieval
set -euo pipefail
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
name=${1:+$1/}retrieval-platform
docker build -f deploy/docker/Dockerfile.cpu -t "$name:$version" .
docker build -f deploy/docker/Dockerfile.cuda -t "$name:$version-cuda" .
echo "built $name:$version and $name:$version-cuda"
