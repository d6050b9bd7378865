# test/moto_override.tf: copied beside the real configuration by terraform/check, where
# Terraform merges it into the real `provider "aws"` block (an override file: the arguments
# here are added or replace those of the same name; default_tags and region stay as they are).
# So the test plans and applies the real root module, unchanged, against a local moto server.

provider "aws" {
  access_key = "testing"
  secret_key = "testing"

  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  s3_use_path_style           = true

  # Every service the configuration calls; a service missing here would go to real AWS.
  endpoints {
    ec2     = var.moto_endpoint
    elbv2   = var.moto_endpoint
    iam     = var.moto_endpoint
    kms     = var.moto_endpoint
    route53 = var.moto_endpoint
    s3      = var.moto_endpoint
    sts     = var.moto_endpoint
  }
}
