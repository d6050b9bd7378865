variable "name_prefix" {
  description = "Prefix of resource names."
  type        = string
}

variable "vpc_cidr" {
  description = "CIDR block of the VPC to create."
  type        = string
}

variable "vpc_id" {
  description = "Existing VPC to use instead of creating one (null: create)."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "With vpc_id: the public subnets to use."
  type        = list(string)
  default     = []
}
