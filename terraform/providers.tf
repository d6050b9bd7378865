# providers.tf: the one AWS provider configuration, with the tags every resource carries.

provider "aws" {
  region = var.region

  # Every taggable resource gets these, so a cluster's resources (and its bill) can be found
  # by tag: `Project = platformx` for all clusters, `Cluster = <name_prefix>` for this one.
  default_tags {
    tags = merge(var.tags, {
      Project   = "platformx"
      Cluster   = var.name_prefix
      ManagedBy = "terraform"
    })
  }
}
