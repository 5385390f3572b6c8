# Production's bucket and job role: the xfer module (../../modules/xfer) with this
# environment's names, and a state of its own (key xfer/prod/terraform.tfstate below),
# apart from development's.
#
#   cp terraform.tfvars.example terraform.tfvars     # once, then fill it in (git-ignored)
#   terraform -chdir=infra/terraform/envs/prod init -backend-config=backend.hcl
#   terraform -chdir=infra/terraform/envs/prod apply
#   terraform -chdir=infra/terraform/envs/prod output -raw role_arn   # = kubectl kustomize k8s/overlays/prod | grep role-arn

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
    key          = "xfer/prod/terraform.tfstate"
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
      environment = "prod"
    }
  }
}

# The bucket and role named in k8s/overlays/prod/settings/xfer-settings.yaml (settings.tf);
# the namespace and service account are k8s/overlays/prod's, the only pods that may
# assume the role. The OIDC provider is the cluster's, in the same account.
module "xfer" {
  source = "../../modules/xfer"

  bucket_name       = local.settings.XFER_BUCKET
  role_name         = local.settings.XFER_IAM_ROLE
  namespace         = "xfer-prod"
  service_account   = "xfer"
  oidc_provider_arn = "arn:aws:iam::${local.settings.XFER_AWS_ACCOUNT}:oidc-provider/${trimprefix(var.oidc_issuer, "https://")}"
}
