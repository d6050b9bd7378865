output "bucket_name" {
  description = "The bundles bucket."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "The bundles bucket's ARN."
  value       = aws_s3_bucket.this.arn
}

output "bucket_region" {
  description = "The region the bucket is in (apprepo's storage.s3.region)."
  value       = aws_s3_bucket.this.region
}

output "control_role_arn" {
  description = "The control hosts' IAM role."
  value       = aws_iam_role.control.arn
}

output "control_instance_profile_name" {
  description = "The control hosts' instance profile."
  value       = aws_iam_instance_profile.control.name
}
