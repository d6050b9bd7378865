variable "name_prefix" {
  description = "Prefix of resource names."
  type        = string
}

variable "vpc_id" {
  description = "The VPC the groups belong to."
  type        = string
}

variable "vpc_cidr" {
  description = "The VPC's CIDR block: the only source allowed on the control ports."
  type        = string
}

variable "admin_cidrs" {
  description = "Sources allowed on SSH and the apprepo and Beacon APIs."
  type        = list(string)
  default     = []
}

variable "enable_load_balancer" {
  description = "Also create the load balancer's group."
  type        = bool
  default     = false
}

variable "enable_api_load_balancer" {
  description = "Also create the control API load balancer's group."
  type        = bool
  default     = false
}
