# Production's bucket, region, AWS account and IAM role, read from the one file that
# names them for both Terraform and Kubernetes: k8s/overlays/prod/settings/xfer-settings.yaml
# (the xfer-settings ConfigMap every Ray pod loads). Renaming the bucket, or moving the
# region or account, is an edit there, then:
#
#   terraform -chdir=infra/terraform/envs/prod apply
#   kubectl apply -k k8s/overlays/prod

locals {
  settings = yamldecode(file("${path.module}/../../../../k8s/overlays/prod/settings/xfer-settings.yaml")).data
}
