#!/usr/bin/env bash
# Create a GKE Standard cluster for MNIST on KubeRay, and an Artifact Registry repository for
# the image. Every setting is an environment variable; DRY_RUN=1 prints the commands that change
# something instead of running them (the lookups, zone and project number, still run).
#
#   export PROJECT=my-project REGION=us-central1      # once, for this script and docs/GKE.md
#   ./k8s/create-gke-cluster.sh
#   SHARED_STORAGE=filestore RAY_MAX_NODES=6 ./k8s/create-gke-cluster.sh
# RAY_OPERATOR=addon turns on GKE's managed KubeRay: then skip docs/GKE.md's Helm install (two
# operators would both reconcile every RayCluster).
#
# Node pools: "default" for system pods and the NFS server; "ray" for the Ray pods, grown and
# shrunk by GKE's cluster autoscaler between RAY_MIN_NODES and RAY_MAX_NODES (docs/GKE.md,
# "Scaling with load"). An e2-standard-8 node holds three Ray pods (2 CPUs each, 2.5 for the
# serving head with its autoscaler sidecar). The default manifests ask for 6 pods at rest
# (training head + 3 workers, serving head + 1 worker: 2 nodes) and 9 at Serve's ceiling (serving
# workers 1 -> 4: 3 nodes); the 4th node is room for a RayService upgrade, which starts a second
# serving cluster beside the first.
# Any failing command stops the script (set -e); nothing is silenced.
set -euo pipefail

PROJECT="${PROJECT:?set PROJECT to your Google Cloud project id}"
REGION="${REGION:?set REGION (e.g. us-central1): the cluster zone and the image registry are in it}"
# Zone names differ by region (us-east1 has no us-east1-a): the first zone that is UP, unless set.
ZONE="${ZONE:-$(gcloud compute zones list --project "$PROJECT" --filter "region:$REGION AND status:UP" \
                  --format 'value(name)' --sort-by name --limit 1)}"
if [[ -z "$ZONE" || "${ZONE%-*}" != "$REGION" ]]; then
  echo "ZONE '$ZONE' is not a zone of REGION $REGION" >&2; exit 2
fi
CLUSTER="${CLUSTER:-mnist}"
RELEASE_CHANNEL="${RELEASE_CHANNEL:-regular}"
SYSTEM_MACHINE="${SYSTEM_MACHINE:-e2-standard-4}"
SYSTEM_NODES="${SYSTEM_NODES:-1}"
RAY_MACHINE="${RAY_MACHINE:-e2-standard-8}"
RAY_MIN_NODES="${RAY_MIN_NODES:-2}"     # the floor: what an idle service pays for
RAY_MAX_NODES="${RAY_MAX_NODES:-4}"     # the cap on the bill, whatever the autoscalers ask
if ! [[ "$RAY_MIN_NODES" =~ ^[0-9]+$ && "$RAY_MAX_NODES" =~ ^[1-9][0-9]*$ ]] || (( RAY_MIN_NODES > RAY_MAX_NODES )); then
  echo "RAY_MIN_NODES ($RAY_MIN_NODES) and RAY_MAX_NODES ($RAY_MAX_NODES) must be whole numbers, min <= max, max >= 1" >&2; exit 2
fi
AUTOSCALING_PROFILE="${AUTOSCALING_PROFILE:-optimize-utilization}"  # or balanced (GKE's default: slower scale-down)
RAY_DISK_GB="${RAY_DISK_GB:-100}"        # the project image is several GB
SHARED_STORAGE="${SHARED_STORAGE:-nfs}"  # nfs | filestore (enables the Filestore CSI driver)
RAY_OPERATOR="${RAY_OPERATOR:-helm}"     # helm (KubeRay v1.7.0, docs/GKE.md) | addon (GKE-managed)
REPOSITORY="${REPOSITORY:-mnist}"        # Artifact Registry repository for the image
# The nodes' own subnet: the NFS server exports only to it (k8s/components/nfs/server), so other VMs
# of the VPC cannot mount the models. Pick a range free in your VPC (auto-mode VPCs use 10.128.0.0/9).
NODE_RANGE="${NODE_RANGE:-10.20.0.0/22}"

run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "+ $*"; else "$@"; fi
}

# Checked before anything is created. (No arrays: macOS's bash 3.2 calls an empty one unbound under set -u.)
case "$SHARED_STORAGE" in
  nfs|filestore) ;;
  *) echo "SHARED_STORAGE must be nfs or filestore, got $SHARED_STORAGE" >&2; exit 2 ;;
esac
case "$RAY_OPERATOR" in
  helm|addon) ;;
  *) echo "RAY_OPERATOR must be helm or addon, got $RAY_OPERATOR" >&2; exit 2 ;;
esac

run gcloud services enable container.googleapis.com artifactregistry.googleapis.com --project "$PROJECT"
if [[ "$SHARED_STORAGE" == filestore ]]; then
  run gcloud services enable file.googleapis.com --project "$PROJECT"
fi

# Dataplane V2 enforces the NetworkPolicies in k8s/. Workload Identity with the GKE metadata
# server: pods cannot read the node's service-account credentials from the metadata server.
run gcloud container clusters create "$CLUSTER" \
  --project "$PROJECT" --location "$ZONE" --release-channel "$RELEASE_CHANNEL" \
  --machine-type "$SYSTEM_MACHINE" --num-nodes "$SYSTEM_NODES" \
  --enable-ip-alias --create-subnetwork "name=$CLUSTER-nodes,range=$NODE_RANGE" \
  --enable-dataplane-v2 --enable-shielded-nodes --shielded-secure-boot \
  --workload-pool "$PROJECT.svc.id.goog" --workload-metadata GKE_METADATA \
  --autoscaling-profile "$AUTOSCALING_PROFILE"

# Add-ons beyond GKE's defaults, enabled one by one after creation: `--addons` at creation would
# turn off every default add-on it does not list.
enable_addon() {
  run gcloud container clusters update "$CLUSTER" --project "$PROJECT" --location "$ZONE" --update-addons "$1"
}
if [[ "$SHARED_STORAGE" == filestore ]]; then enable_addon GcpFilestoreCsiDriver=ENABLED; fi
if [[ "$RAY_OPERATOR" == addon ]]; then enable_addon RayOperator=ENABLED; fi

# The cluster autoscaler adds a node when a Ray pod stays Pending for lack of one (KubeRay's
# autoscaler asked for it), and removes a node that Ray's autoscaler has emptied. The Ray pods
# carry cluster-autoscaler.kubernetes.io/safe-to-evict: "false", so GKE never evicts one to pack
# nodes tighter: which pods come and go is Ray's decision. The cluster is zonal, so the per-zone
# --min-nodes/--max-nodes are the pool's totals.
run gcloud container node-pools create ray \
  --project "$PROJECT" --cluster "$CLUSTER" --location "$ZONE" \
  --machine-type "$RAY_MACHINE" --num-nodes "$RAY_MIN_NODES" --disk-size "$RAY_DISK_GB" \
  --enable-autoscaling --min-nodes "$RAY_MIN_NODES" --max-nodes "$RAY_MAX_NODES" \
  --shielded-secure-boot --workload-metadata GKE_METADATA

# The image registry, in the same region; created only if absent (any other error stops here).
if [[ "${DRY_RUN:-0}" == 1 ]] || ! gcloud artifacts repositories describe "$REPOSITORY" \
     --project "$PROJECT" --location "$REGION" >/dev/null 2>&1; then
  run gcloud artifacts repositories create "$REPOSITORY" \
    --project "$PROJECT" --location "$REGION" --repository-format docker
fi

# Nodes pull the image as the node service account (Compute Engine's default one here).
number="$(gcloud projects describe "$PROJECT" --format 'value(projectNumber)')"
run gcloud artifacts repositories add-iam-policy-binding "$REPOSITORY" \
  --project "$PROJECT" --location "$REGION" \
  --member "serviceAccount:$number-compute@developer.gserviceaccount.com" \
  --role roles/artifactregistry.reader

run gcloud container clusters get-credentials "$CLUSTER" --project "$PROJECT" --location "$ZONE"

echo "Nodes: $NODE_RANGE (the NFS server exports only to it); zone $ZONE"
echo "Image: $REGION-docker.pkg.dev/$PROJECT/$REPOSITORY/mnist-ray:<ray version>-py311 (docs/GKE.md, step 3)"
