# versions.tf: the Terraform and provider versions this configuration is written and tested for.

terraform {
  # 1.5 for `check` blocks and the `validation`/`precondition` forms used here.
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source = "hashicorp/aws"
      # 5.100 is the version `terraform/check` validates and tests against; `~>` takes later
      # 5.x fixes but never a 6.0 with its breaking changes.
      version = "~> 5.100"
    }
  }
}
