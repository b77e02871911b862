#!/usr/bin/env bash
# Create a GKE Standard cluster for MNIST on KubeRay, and an Artifact Registry repository for
# the image. Every setting is an environment variable; DRY_RUN=1 prints the commands instead.
#
#   PROJECT=my-project ./k8s/create-gke-cluster.sh
#   PROJECT=my-project SHARED_STORAGE=filestore RAY_OPERATOR=addon RAY_NODES=4 ./k8s/create-gke-cluster.sh
#
# Node pools: "default" for system pods and the NFS server; "ray" for the Ray pods. The defaults
# fit the default manifests: training head + 3 workers and serving head + 1 worker, 2 CPUs each.
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
ZONE="${ZONE:-us-central1-a}"
REGION="${REGION:-${ZONE%-*}}"
CLUSTER="${CLUSTER:-mnist}"
RELEASE_CHANNEL="${RELEASE_CHANNEL:-regular}"
SYSTEM_MACHINE="${SYSTEM_MACHINE:-e2-standard-4}"
SYSTEM_NODES="${SYSTEM_NODES:-1}"
RAY_MACHINE="${RAY_MACHINE:-e2-standard-8}"
RAY_NODES="${RAY_NODES:-3}"
RAY_DISK_GB="${RAY_DISK_GB:-100}"        # the project image is several GB
SHARED_STORAGE="${SHARED_STORAGE:-nfs}"  # nfs | filestore (enables the Filestore CSI driver)
RAY_OPERATOR="${RAY_OPERATOR:-helm}"     # helm (KubeRay v1.7.0, docs/GKE.md) | addon (GKE-managed)
REPOSITORY="${REPOSITORY:-mnist}"        # Artifact Registry repository for the image

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi
}

addons="GcePersistentDiskCsiDriver"
case "$SHARED_STORAGE" in
  nfs) ;;
  filestore) addons+=",GcpFilestoreCsiDriver" ;;
  *) echo "SHARED_STORAGE must be nfs or filestore, got $SHARED_STORAGE" >&2; exit 2 ;;
esac
case "$RAY_OPERATOR" in
  helm) ;;
  addon) addons+=",RayOperator" ;;
  *) echo "RAY_OPERATOR must be helm or addon, got $RAY_OPERATOR" >&2; exit 2 ;;
esac

# Dataplane V2 enforces the NetworkPolicies in k8s/base/networkpolicy.yaml.
run gcloud container clusters create "$CLUSTER" \
  --project "$PROJECT" --location "$ZONE" --release-channel "$RELEASE_CHANNEL" \
  --machine-type "$SYSTEM_MACHINE" --num-nodes "$SYSTEM_NODES" \
  --enable-dataplane-v2 --enable-shielded-nodes --shielded-secure-boot \
  --addons "$addons"

run gcloud container node-pools create ray \
  --project "$PROJECT" --cluster "$CLUSTER" --location "$ZONE" \
  --machine-type "$RAY_MACHINE" --num-nodes "$RAY_NODES" --disk-size "$RAY_DISK_GB" \
  --shielded-secure-boot

run gcloud artifacts repositories create "$REPOSITORY" \
  --project "$PROJECT" --location "$REGION" --repository-format docker \
  || echo "(repository $REPOSITORY may already exist)"

run gcloud container clusters get-credentials "$CLUSTER" --project "$PROJECT" --location "$ZONE"

echo "Image: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/mnist-ray:<ray version>-py311 (docs/GKE.md, step 3)"
