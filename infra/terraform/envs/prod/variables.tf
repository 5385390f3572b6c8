# What differs between installations of the prod environment, from terraform.tfvars
# (copy terraform.tfvars.example):
#
#   terraform -chdir=infra/terraform/envs/prod apply

variable "region" {
  description = "AWS region of the bucket. The jobs get theirs from AWS_REGION in k8s/overlays/prod/kustomization.yaml (xfer-settings): keep the two equal."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider, for IRSA (see terraform.tfvars.example)."
  type        = string
}
