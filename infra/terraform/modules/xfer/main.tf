# The bucket of xfer's object-storage layout (README.md), private and versioned. A module:
# each environment applies it from its own directory, with its own state.
#
#   terraform -chdir=infra/terraform/envs/prod plan
#   terraform -chdir=infra/terraform/envs/prod apply

resource "aws_s3_bucket" "xfer" {
  bucket = var.bucket_name
}

# ACLs off: every object belongs to the bucket owner whoever wrote it.
resource "aws_s3_bucket_ownership_controls" "xfer" {
  bucket = aws_s3_bucket.xfer.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "xfer" {
  bucket = aws_s3_bucket.xfer.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# latest.json is overwritten on every publish, partitions are replaced on re-runs:
# versioning keeps the previous state for noncurrent_version_expiration_days.
resource "aws_s3_bucket_versioning" "xfer" {
  bucket = aws_s3_bucket.xfer.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "xfer" {
  bucket = aws_s3_bucket.xfer.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # Fewer KMS requests (and less cost) for the many small objects of a run.
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "xfer" {
  bucket = aws_s3_bucket.xfer.id

  # xfer stages multi-object outputs under _tmp/ and deletes them after the commit;
  # a crashed job leaves them behind (src/xfer/store/storage.py, staging_prefix).
  rule {
    id     = "expire-tmp"
    status = "Enabled"

    filter {
      prefix = "_tmp/"
    }

    expiration {
      days = var.tmp_expiration_days
    }

    # Deleted staging objects become noncurrent versions in a versioned bucket.
    noncurrent_version_expiration {
      noncurrent_days = 1
    }
  }

  # Checkpoints and model files go up in parts; a killed worker leaves parts that are
  # billed but invisible.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # Old checkpoints (Ray Train keeps the last two), replaced partitions, moved
  # latest.json pointers.
  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }
  }

  # A lifecycle rule on an unversioned bucket behaves differently: version first.
  depends_on = [aws_s3_bucket_versioning.xfer]
}
