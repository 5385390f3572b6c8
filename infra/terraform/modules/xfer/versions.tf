# Terraform and provider versions the xfer module needs. The module configures no
# provider and no state backend: each environment does (infra/terraform/envs/<env>/).
#
#   terraform -chdir=infra/terraform/envs/prod init -backend-config=backend.hcl
terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}
