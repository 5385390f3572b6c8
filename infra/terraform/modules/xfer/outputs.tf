# What the rest of the deployment needs from this module (each environment passes them
# on as its own outputs):
#
#   terraform -chdir=infra/terraform/envs/prod output
#   terraform -chdir=infra/terraform/envs/prod output -raw role_arn
#
# role_arn is what the k8s irsa component writes on the xfer ServiceAccount, from the
# same settings (k8s/overlays/<env>/settings/xfer-settings.yaml);
# bucket_name is the config's storage.root (s3://<bucket_name>).

output "bucket_name" {
  description = "Name of the xfer bucket."
  value       = aws_s3_bucket.xfer.bucket
}

output "bucket_arn" {
  description = "ARN of the xfer bucket."
  value       = aws_s3_bucket.xfer.arn
}

output "role_arn" {
  description = "IAM role for the jobs' service account (eks.amazonaws.com/role-arn)."
  value       = aws_iam_role.jobs.arn
}

output "policy_arn" {
  description = "The jobs' S3 policy, attached to role_arn."
  value       = aws_iam_policy.jobs.arn
}
