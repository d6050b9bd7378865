variable "name_prefix" {
  description = "Prefix of resource names (at most 24 characters: <prefix>-apprepo, a target group name, has at most 32)."
  type        = string
}

variable "vpc_id" {
  description = "The VPC of the control hosts."
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

variable "control_azs" {
  description = "The availability zone of each control host, in order."
  type        = list(string)
}

variable "security_group_id" {
  description = "The API load balancer's security group."
  type        = string
}

variable "control_instance_ids" {
  description = "The control hosts, every one running apprepo and Beacon."
  type        = list(string)
}

variable "apprepo_port" {
  description = "apprepo's API port on the control hosts, passed through on the same port."
  type        = number
}

variable "beacon_port" {
  description = "Beacon's API port on the control hosts, passed through on the same port."
  type        = number
}
