# Where dev's Terraform state lives (the key is in main.tf), for
#
#   terraform -chdir=infra/terraform/envs/dev init -backend-config=backend.hcl
#
# One versioned bucket for all state, made once by hand; locking is a lock file next to
# the state (use_lockfile, Terraform >= 1.10), so no DynamoDB table is needed.
bucket = "xfer-terraform-state"
region = "us-east-1"
