#!/usr/bin/env bash
# Builds the three images with the names the Kubernetes manifests use (deploy/k8s): the version comes
# from pyproject.toml, so a release bump changes code, images and manifests together (tests/deploy
# checks that the manifests name these images).
#   retrieval-platform:<version>        Dockerfile.cpu    the encoder on CPU (torch, the models)
#   retrieval-platform-cuda:<version>   Dockerfile.cuda   the encoder on NVIDIA GPUs
#   retrieval-platform-slim:<version>   Dockerfile.slim   search, evaluator, Jobs (no torch)
# Usage: deploy/docker/build.sh [REGISTRY] [--push]
#   --push pushes them and prints each one's digest, for `digest:` in the overlay's `images:`.
set -euo pipefail
cd "$(dirname "$0")/../.."
registry=${1:-}
[ "$registry" = "--push" ] && registry=""
push=$([[ " $* " == *" --push "* ]] && echo 1 || echo 0)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
name=${registry:+$registry/}retrieval-platform
docker build -f deploy/docker/Dockerfile.cpu -t "$name:$version" .
docker build -f deploy/docker/Dockerfile.cuda -t "$name-cuda:$version" .
docker build -f deploy/docker/Dockerfile.slim -t "$name-slim:$version" .
echo "built $name:$version, $name-cuda:$version and $name-slim:$version"
if [ "$push" = 1 ]; then
  for image in "$name:$version" "$name-cuda:$version" "$name-slim:$version"; do
    docker push --quiet "$image" >/dev/null
    echo "pushed $(docker image inspect --format '{{index .RepoDigests 0}}' "$image")"
  done
fi
