variable "name_prefix" {
  description = "Prefix of resource names (at most 24 characters: target group names, <prefix>-web-https, have at most 32)."
  type        = string
}

variable "vpc_id" {
  description = "The VPC of the web servers."
  type        = string
}

variable "subnet_ids" {
  description = "Public subnets for the load balancer, in at least two AZs."
  type        = list(string)
}

variable "subnet_azs" {
  description = "The availability zone of each of subnet_ids."
  type        = list(string)
}

variable "security_group_id" {
  description = "The load balancer's security group."
  type        = string
}

variable "web_instance_ids" {
  description = "The web servers to forward to."
  type        = list(string)
}
