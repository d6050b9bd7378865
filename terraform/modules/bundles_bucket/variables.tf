variable "name_prefix" {
  description = "Prefix of resource names."
  type        = string
}

variable "bucket_name" {
  description = "Bucket name (null: a unique name starting with <name_prefix>-bundles-)."
  type        = string
  default     = null
}

variable "kms_key_arn" {
  description = "KMS key for SSE-KMS (null: SSE-S3, AES256)."
  type        = string
  default     = null
}

variable "noncurrent_version_days" {
  description = "Days before a noncurrent object version expires."
  type        = number
  default     = 30
}

variable "force_destroy" {
  description = "Allow destroying the bucket with objects in it."
  type        = bool
  default     = false
}
