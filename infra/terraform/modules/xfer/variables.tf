# Inputs of the xfer module. Each environment sets them in its own directory
# (infra/terraform/envs/<env>/main.tf), and applies with its own state:
#
#   terraform -chdir=infra/terraform/envs/prod apply
#
# The region is not an input here: it is the provider's, configured by the environment.

variable "bucket_name" {
  description = "Bucket holding datasets/, weights/, runs/, models/, predictions/ and _tmp/ (the config's storage.root is s3://<bucket_name>)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::<account>:oidc-provider/oidc.eks.<region>.amazonaws.com/id/<id>), for IRSA."
  type        = string

  validation {
    condition     = can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:oidc-provider/.+", var.oidc_provider_arn))
    error_message = "oidc_provider_arn must be an IAM OIDC provider ARN."
  }
}

variable "namespace" {
  description = "Kubernetes namespace the jobs run in (the overlay's namespace)."
  type        = string
}

variable "service_account" {
  description = "Kubernetes service account of the Ray pods (k8s/base/serviceaccount.yaml)."
  type        = string
  default     = "xfer"
}

variable "role_name" {
  description = "Name of the IAM role for the jobs; default <bucket_name>-jobs. The environments pass XFER_IAM_ROLE of k8s/overlays/<env>/settings/xfer-settings.yaml, which the k8s irsa component names too."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "Customer-managed KMS key for default encryption (SSE-KMS); null for SSE-S3 (AES256)."
  type        = string
  default     = null
}

variable "tmp_expiration_days" {
  description = "Days after which objects under _tmp/ (staging left behind by crashed jobs) expire."
  type        = number
  default     = 1
}

variable "noncurrent_version_expiration_days" {
  description = "Days a replaced or deleted object version is kept (the window to undo an overwrite)."
  type        = number
  default     = 30
}

variable "allow_dataset_writes" {
  description = "Also let the job role write datasets/ (for running `xfer shard` with it); off: training and scoring only read datasets."
  type        = bool
  default     = false
}
