# Development's bucket and job role: the xfer module (../../modules/xfer) with this
# environment's names, and a state of its own (key xfer/dev/terraform.tfstate below),
# apart from production's.
#
#   cp terraform.tfvars.example terraform.tfvars     # once, then fill it in (git-ignored)
#   terraform -chdir=infra/terraform/envs/dev init -backend-config=backend.hcl
#   terraform -chdir=infra/terraform/envs/dev apply
#   terraform -chdir=infra/terraform/envs/dev output -raw role_arn   # = kubectl kustomize k8s/overlays/dev | grep role-arn

terraform {
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }

  # The key is fixed here, one per environment directory, so that no command line can
  # point this environment at another's state; backend.hcl names the state bucket.
  backend "s3" {
    key          = "xfer/dev/terraform.tfstate"
    encrypt      = true
    use_lockfile = true
  }
}

provider "aws" {
  region = local.settings.AWS_REGION
  # Applying with credentials of another account fails before anything is made.
  allowed_account_ids = [local.settings.XFER_AWS_ACCOUNT]

  default_tags {
    tags = {
      project     = "xfer"
      environment = "dev"
    }
  }
}

# The bucket and role named in k8s/overlays/dev/settings/xfer-settings.yaml (settings.tf);
# the namespace and service account are k8s/overlays/dev's, the only pods that may
# assume the role. The OIDC provider is the cluster's, in the same account.
module "xfer" {
  source = "../../modules/xfer"

  bucket_name       = local.settings.XFER_BUCKET
  role_name         = local.settings.XFER_IAM_ROLE
  namespace         = "xfer-dev"
  service_account   = "xfer"
  oidc_provider_arn = "arn:aws:iam::${local.settings.XFER_AWS_ACCOUNT}:oidc-provider/${trimprefix(var.oidc_issuer, "https://")}"
}
