# The module's outputs, for this environment:
#
#   terraform -chdir=infra/terraform/envs/prod output -raw role_arn
#
# role_arn equals the xfer ServiceAccount's eks.amazonaws.com/role-arn, which k8s/overlays/prod
# builds from the same settings (settings/xfer-settings.yaml: XFER_AWS_ACCOUNT, XFER_IAM_ROLE).

output "bucket_name" {
  description = "Name of the xfer bucket."
  value       = module.xfer.bucket_name
}

output "bucket_arn" {
  description = "ARN of the xfer bucket."
  value       = module.xfer.bucket_arn
}

output "role_arn" {
  description = "IAM role for the jobs' service account (eks.amazonaws.com/role-arn)."
  value       = module.xfer.role_arn
}

output "policy_arn" {
  description = "The jobs' S3 policy, attached to role_arn."
  value       = module.xfer.policy_arn
}
