#!/usr/bin/env bash
# Create a GKE Standard cluster for MNIST on KubeRay, and an Artifact Registry repository for
# the image. Every setting is an environment variable; DRY_RUN=1 prints the commands instead.
#
#   export PROJECT=my-project REGION=us-central1      # once, for this script and docs/GKE.md
#   ./k8s/create-gke-cluster.sh
#   SHARED_STORAGE=filestore RAY_OPERATOR=addon RAY_NODES=4 ./k8s/create-gke-cluster.sh
#
# Node pools: "default" for system pods and the NFS server; "ray" for the Ray pods. The defaults
# fit the default manifests: training head + 3 workers and serving head + 1 worker, 2 CPUs each.
# Any failing command stops the script (set -e); nothing is silenced.
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:?set REGION (e.g. us-central1): the cluster zone and the image registry are in it}"
ZONE="${ZONE:-$REGION-a}"
if [[ "${ZONE%-*}" != "$REGION" ]]; then
  echo "ZONE $ZONE is not in REGION $REGION" >&2; exit 2
fi
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

apis=(container.googleapis.com artifactregistry.googleapis.com)
# Add-ons beyond GKE's defaults, enabled one by one after creation: `--addons` at creation would
# turn off every default add-on it does not list.
extra_addons=()
case "$SHARED_STORAGE" in
  nfs) ;;
  filestore) extra_addons+=(GcpFilestoreCsiDriver=ENABLED); apis+=(file.googleapis.com) ;;
  *) echo "SHARED_STORAGE must be nfs or filestore, got $SHARED_STORAGE" >&2; exit 2 ;;
esac
case "$RAY_OPERATOR" in
  helm) ;;
  addon) extra_addons+=(RayOperator=ENABLED) ;;
  *) echo "RAY_OPERATOR must be helm or addon, got $RAY_OPERATOR" >&2; exit 2 ;;
esac

run gcloud services enable "${apis[@]}" --project "$PROJECT"

# Dataplane V2 enforces the NetworkPolicies in k8s/. Workload Identity with the GKE metadata
# server: pods cannot read the node's service-account credentials from the metadata server.
run gcloud container clusters create "$CLUSTER" \
  --project "$PROJECT" --location "$ZONE" --release-channel "$RELEASE_CHANNEL" \
  --machine-type "$SYSTEM_MACHINE" --num-nodes "$SYSTEM_NODES" \
  --enable-dataplane-v2 --enable-shielded-nodes --shielded-secure-boot \
  --workload-pool "$PROJECT.svc.id.goog" --workload-metadata GKE_METADATA

for addon in "${extra_addons[@]}"; do
  run gcloud container clusters update "$CLUSTER" --project "$PROJECT" --location "$ZONE" \
    --update-addons "$addon"
done

run gcloud container node-pools create ray \
  --project "$PROJECT" --cluster "$CLUSTER" --location "$ZONE" \
  --machine-type "$RAY_MACHINE" --num-nodes "$RAY_NODES" --disk-size "$RAY_DISK_GB" \
  --shielded-secure-boot --workload-metadata GKE_METADATA

# The image registry, in the same region; created only if absent (any other error stops here).
if [[ "${DRY_RUN:-0}" == 1 ]] || ! gcloud artifacts repositories describe "$REPOSITORY" \
     --project "$PROJECT" --location "$REGION" >/dev/null 2>&1; then
  run gcloud artifacts repositories create "$REPOSITORY" \
    --project "$PROJECT" --location "$REGION" --repository-format docker
fi

# Nodes pull the image as the node service account (Compute Engine's default one here).
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  number=PROJECT_NUMBER
else
  number="$(gcloud projects describe "$PROJECT" --format 'value(projectNumber)')"
fi
run gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" \
  --project "$PROJECT" --location "$REGION" \
  --member "serviceAccount:$number-compute@developer.gserviceaccount.com" \
  --role roles/artifactregistry.reader

run gcloud container clusters get-credentials "$CLUSTER" --project "$PROJECT" --location "$ZONE"

echo "Image: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/mnist-ray:<ray version>-py311 (docs/GKE.md, step 3)"
