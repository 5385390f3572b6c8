# Provider and Terraform versions for the xfer bucket and job role.
#
#   terraform -chdir=infra/terraform init
#   terraform -chdir=infra/terraform apply -var-file=prod.tfvars
#
# State holds the bucket and role ARNs, no secrets; still, keep it in a remote backend
# (an S3 bucket with locking) rather than on a laptop: add a `backend "s3" {}` block
# here and pass its settings with `terraform init -backend-config=...`.
terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}
