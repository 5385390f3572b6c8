# What differs between installations of the prod environment, from terraform.tfvars
# (copy terraform.tfvars.example). The bucket, region, account and role are not here:
# they are in k8s/overlays/prod/settings/xfer-settings.yaml (settings.tf reads it).
#
#   terraform -chdir=infra/terraform/envs/prod apply

variable "oidc_issuer" {
  description = "The EKS cluster's OIDC issuer, as `aws eks describe-cluster --name <cluster> --query cluster.identity.oidc.issuer --output text` prints it (https:// is optional); its IAM OIDC provider must exist in the account of xfer-settings."
  type        = string

  validation {
    condition     = can(regex("^(https://)?oidc\\.eks\\.[a-z0-9-]+\\.amazonaws\\.com/id/[A-Za-z0-9]+$", var.oidc_issuer))
    error_message = "oidc_issuer must look like https://oidc.eks.<region>.amazonaws.com/id/<id>."
  }
}
