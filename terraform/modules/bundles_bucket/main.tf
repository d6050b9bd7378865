# modules/bundles_bucket: the S3 bucket apprepo keeps bundles and releases in (the layout is in
# docs/src/design/storage.md), and the IAM role and instance profile that let the control hosts use
# that bucket and nothing else. apprepo takes the role's credentials from the instance metadata
# service through the AWS SDK's default chain, so no access key is ever written to a host.

# ec2.amazonaws.com, or ec2.amazonaws.com.cn in the China regions.
data "aws_partition" "current" {}

resource "aws_s3_bucket" "this" {
  bucket = var.bucket_name
  # Bucket names are global across all AWS accounts, so without a name given Terraform adds a
  # unique suffix to the prefix (which may have 37 characters; name_prefix has at most 24).
  bucket_prefix = var.bucket_name == null ? "${var.name_prefix}-bundles-" : null
  force_destroy = var.force_destroy

  tags = { Name = "${var.name_prefix}-bundles" }
}

# Objects belong to the bucket owner and ACLs are off: access is by IAM policy only.
resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioning keeps the previous app pointer (apps/<app>/app.json) when a deploy replaces it,
# so a bad write can be undone by hand; the lifecycle rule below bounds what that keeps.
resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == null ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    # With KMS, a bucket key cuts the KMS requests (and their cost) by orders of magnitude.
    bucket_key_enabled = var.kms_key_arn != null
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
  }

  rule {
    # apprepo aborts the multipart uploads it gives up on, but not those of a process that was
    # killed mid-upload; their parts would be billed forever.
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # The rules apply to versions, so versioning must be on first.
  depends_on = [aws_s3_bucket_versioning.this]
}

# Plain-HTTP requests are refused whoever makes them.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.this.arn, "${aws_s3_bucket.this.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  # S3 refuses a policy while the public access block is being changed.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# --- The control hosts' role ------------------------------------------------------------------

data "aws_iam_policy_document" "assume_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.${data.aws_partition.current.dns_suffix}"]
    }
  }
}

resource "aws_iam_role" "control" {
  name_prefix        = "${var.name_prefix}-control-"
  description        = "Platform.X control hosts: apprepo's access to the bundles bucket"
  assume_role_policy = data.aws_iam_policy_document.assume_ec2.json
  tags               = { Name = "${var.name_prefix}-control" }
}

# What apprepo calls (crates/repository/src/storage/s3.rs): HeadBucket (s3:ListBucket),
# ListObjectsV2, HeadObject/GetObject, PutObject (with If-None-Match/If-Match), and multipart
# uploads, which it aborts on failure. DeleteObject is for clean-ups by hand or by a future
# garbage collector. Nothing here names another bucket or s3:* .
data "aws_iam_policy_document" "bundles_access" {
  statement {
    sid = "BundlesBucket"
    actions = [
      "s3:ListBucket",
      "s3:ListBucketMultipartUploads",
      "s3:GetBucketLocation",
    ]
    resources = [aws_s3_bucket.this.arn]
  }

  statement {
    sid = "BundlesObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.this.arn}/*"]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [var.kms_key_arn]
    content {
      sid       = "BundlesKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "bundles_access" {
  name   = "bundles-bucket"
  role   = aws_iam_role.control.id
  policy = data.aws_iam_policy_document.bundles_access.json
}

resource "aws_iam_instance_profile" "control" {
  name_prefix = "${var.name_prefix}-control-"
  role        = aws_iam_role.control.name
  tags        = { Name = "${var.name_prefix}-control" }
}
