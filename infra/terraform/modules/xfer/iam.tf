# The IAM role of the xfer jobs (training, nightly scoring), assumed by the Ray pods
# through IRSA, and its least-privilege S3 policy.
#
#   terraform -chdir=infra/terraform/envs/prod apply           # this module, for production
#   terraform -chdir=infra/terraform/envs/prod output -raw role_arn   # = the xfer ServiceAccount's role
#
# What the jobs touch (README.md, "Object-storage layout"; src/xfer/store/storage.py):
#   read        datasets/ weights/ incoming/   shards, pretrained weights, new images
#   read+write  runs/        checkpoints (Ray Train deletes old ones), metrics, model
#   read+write  models/      latest.json and history/ (publish, rollback)
#   read+write  predictions/ nightly partitions, replaced whole on a re-run
#   read+write  _tmp/        staging: sets of objects are written here, then copied
#   read+write  features/    the head phase's cached base features (model.head.features)
# No s3:* and no "*" resources: a new prefix means a deliberate edit here.

locals {
  role_name  = coalesce(var.role_name, "${var.bucket_name}-jobs")
  bucket_arn = aws_s3_bucket.xfer.arn
  # The issuer as IAM spells the condition keys: oidc.eks.<region>.amazonaws.com/id/<id>
  oidc_issuer = element(split(":oidc-provider/", var.oidc_provider_arn), 1)
}

# Prefixes are spelt out, not generated, so that a review reads what the role can do.
data "aws_iam_policy_document" "jobs" {
  # Listing, only under the prefixes the jobs use (the bare name too: pyarrow lists
  # "runs/" when asked about "runs").
  statement {
    sid       = "ListJobPrefixes"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values = [
        "datasets", "datasets/*",
        "weights", "weights/*",
        "incoming", "incoming/*",
        "runs", "runs/*",
        "models", "models/*",
        "predictions", "predictions/*",
        "_tmp", "_tmp/*",
        "features", "features/*",
      ]
    }
  }

  # HeadBucket is authorised as s3:ListBucket, with no prefix in the request: pyarrow
  # calls it before creating Ray Train's run directory, and xfer before its first
  # write. The price: a listing without a prefix (key names, not contents) is allowed.
  statement {
    sid       = "HeadBucket"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "Null"
      variable = "s3:prefix"
      values   = ["true"]
    }
  }

  # The bare prefix key as well as everything below it: pyarrow HEADs a directory's
  # own key first, and a 403 there is an error where a 404 is not.
  statement {
    sid     = "ReadJobObjects"
    effect  = "Allow"
    actions = ["s3:GetObject"]
    resources = [
      "${local.bucket_arn}/datasets", "${local.bucket_arn}/datasets/*",
      "${local.bucket_arn}/weights", "${local.bucket_arn}/weights/*",
      "${local.bucket_arn}/incoming", "${local.bucket_arn}/incoming/*",
      "${local.bucket_arn}/runs", "${local.bucket_arn}/runs/*",
      "${local.bucket_arn}/models", "${local.bucket_arn}/models/*",
      "${local.bucket_arn}/predictions", "${local.bucket_arn}/predictions/*",
      "${local.bucket_arn}/_tmp", "${local.bucket_arn}/_tmp/*",
      "${local.bucket_arn}/features", "${local.bucket_arn}/features/*",
    ]
  }

  # PutObject covers multipart uploads (checkpoints, models); aborting one is separate.
  # DeleteObject: Ray Train prunes checkpoints, xfer clears staging and replaced files.
  statement {
    sid     = "WriteJobOutputs"
    effect  = "Allow"
    actions = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = [
      "${local.bucket_arn}/runs/*",
      "${local.bucket_arn}/models/*",
      "${local.bucket_arn}/predictions/*",
      "${local.bucket_arn}/_tmp/*",
      "${local.bucket_arn}/features/*",
    ]
  }

  # `xfer shard` writes datasets/ (staged under _tmp/, allowed above); off by default so
  # that a training or scoring bug cannot damage a dataset.
  dynamic "statement" {
    for_each = var.allow_dataset_writes ? ["datasets"] : []

    content {
      sid       = "WriteDatasets"
      effect    = "Allow"
      actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
      resources = ["${local.bucket_arn}/datasets/*"]
    }
  }

  # With SSE-KMS every read and write also needs the key.
  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]

    content {
      sid       = "UseBucketKey"
      effect    = "Allow"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_policy" "jobs" {
  name        = "${local.role_name}-s3"
  description = "xfer jobs: read and write their prefixes of s3://${var.bucket_name}"
  policy      = data.aws_iam_policy_document.jobs.json
}

# IRSA: only pods running as <namespace>/<service_account> in this cluster, holding a
# token minted for STS, can assume the role. No access keys exist to leak or rotate.
data "aws_iam_policy_document" "trust" {
  statement {
    sid     = "XferServiceAccount"
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]

    principals {
      type        = "Federated"
      identifiers = [var.oidc_provider_arn]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.namespace}:${var.service_account}"]
    }

    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "jobs" {
  name               = local.role_name
  description        = "xfer training and scoring jobs (${var.namespace}/${var.service_account})"
  assume_role_policy = data.aws_iam_policy_document.trust.json
}

resource "aws_iam_role_policy_attachment" "jobs" {
  role       = aws_iam_role.jobs.name
  policy_arn = aws_iam_policy.jobs.arn
}
